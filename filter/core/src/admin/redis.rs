//! The admin API in global mode: one call of `apikey_ratelimit_admin` (see
//! `gcra.lua`) per operator call, and its answer read as the key's usage.

use std::fmt::Write;

use crate::admin::Op;
use crate::batch::replay;
use crate::batch::wire::{check_nonce, write_set, EntryReply};
use crate::gcra::{Decision, Limit};
use crate::webdis::{encode_into, fcall_integers, parse_error, BackendError};

/// The function (registered by the library, checked by a test).
pub const FUNCTION: &str = "apikey_ratelimit_admin";

/// The `:path` of call `nonce` doing `op` on `redis_key` over `limits`
/// (each costing 1). A reset or grant also counts up `epoch_key`, the
/// admin epoch every replica polls ([`crate::admin::epoch`]).
pub fn path(nonce: u64, redis_key: &str, epoch_key: &str, op: Op, limits: &[Limit]) -> String {
    let (code, amount) = match op {
        Op::Inspect => (0, 0),
        Op::Reset => (1, 0),
        Op::Grant(n) => (2, n),
    };
    let mut path = format!("/FCALL/{FUNCTION}/2/");
    encode_into(&mut path, redis_key.as_bytes());
    path.push('/');
    encode_into(&mut path, epoch_key.as_bytes());
    let _ = write!(path, "/{nonce}/{code}/{amount}");
    write_set(&mut path, limits);
    path
}

/// The key's usage after the call, from `{nonce, now_us, debt_1...}`.
pub fn reading(
    status: Option<u32>,
    body: &[u8],
    nonce: u64,
    limits: &[Limit],
) -> Result<Decision, BackendError> {
    let numbers = fcall_integers(status, body)?;
    check_nonce(&numbers, nonce)?;
    let (Some(now_us), Some(debts)) = (numbers.get(1), numbers.get(2..)) else {
        return Err(parse_error("the admin function answered too few integers"));
    };
    let entry = EntryReply {
        admitted: 0,
        debts_us: debts.iter().copied().collect(),
    };
    replay::peek(limits, *now_us, &entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::limit;

    #[test]
    fn a_call_names_its_op_and_set_and_its_answer_is_read_back() {
        let limits = [limit(3, 60, 3)];
        assert_eq!(
            path(9, "rl:k", "rl:epoch", Op::Grant(2), &limits),
            "/FCALL/apikey_ratelimit_admin/2/rl%3Ak/rl%3Aepoch/9/2/2/1/3%2F60s/20000000/60000000"
        );
        let read = reading(
            Some(200),
            br#"{"FCALL":[9,1000000000,20000000]}"#,
            9,
            &limits,
        );
        assert_eq!(read.unwrap().states()[0].remaining, 2);
        let other = reading(Some(200), br#"{"FCALL":[8,1000000000,0]}"#, 9, &limits);
        assert!(other.is_err());
        let short = reading(Some(200), br#"{"FCALL":[9,1000000000]}"#, 9, &limits);
        assert!(short.is_err());
    }

    #[test]
    fn the_library_registers_the_function() {
        assert!(crate::webdis::LIBRARY
            .contains(&format!("redis.register_function('{FUNCTION}', admin)")));
    }
}
