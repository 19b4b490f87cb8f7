//! [`Proc`]: a child process with its stdout and stderr in a log file, killed when the
//! guard drops. On a panicking drop it prints the tail of its log to stderr (the test
//! harness shows that output under the failed test) and keeps the log directory.
//!
//! Children also die when the test binary dies (killed, or `abort`): they get
//! `PR_SET_PDEATHSIG = SIGKILL`. That signal fires when the *thread* that forked them
//! exits, not the process, so every child is forked by one long-lived spawner thread;
//! otherwise a `Proc` started in a helper thread would be killed as that thread ends.
//!
//! A foreground program (`make run`'s `demo`) calls [`send_output_to_terminal`] first:
//! its children then write to its terminal instead of a log file.

use crate::Error;
use std::fs::File;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tempfile::TempDir;

/// Lines of log printed when a `Proc` drops during a panic.
pub const PANIC_TAIL_LINES: usize = 60;

/// How long [`Proc::stop`] waits after SIGTERM before it sends SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

static OUTPUT_TO_TERMINAL: AtomicBool = AtomicBool::new(false);

/// From now on, children write to this process's stdout and stderr instead of a
/// log file (their [`Proc::log`] is then empty).
pub fn send_output_to_terminal() {
    OUTPUT_TO_TERMINAL.store(true, Ordering::Relaxed);
}

fn output_to_terminal() -> bool {
    OUTPUT_TO_TERMINAL.load(Ordering::Relaxed)
}

/// The signals tests send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
    /// Freeze the process: it keeps its sockets open but answers nothing.
    Stop,
    Cont,
    Int,
    Hup,
    Usr1,
}

impl Signal {
    pub fn raw(self) -> libc::c_int {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
            Signal::Int => libc::SIGINT,
            Signal::Hup => libc::SIGHUP,
            Signal::Usr1 => libc::SIGUSR1,
        }
    }
}

/// A running (or exited, not yet dropped) child process.
pub struct Proc {
    name: String,
    pid: u32,
    // Behind a mutex so every method takes `&self`: a test can share a `&Proc` with a
    // thread that freezes it mid-load.
    child: Mutex<Child>,
    log_path: PathBuf,
    dir_path: PathBuf,
    dir: Option<TempDir>,
}

impl Proc {
    /// Spawns `cmd` with stdin from /dev/null and stdout+stderr appended to
    /// `<tempdir>/<name>.log`, in a fresh temp dir of its own.
    pub fn spawn(name: &str, cmd: Command) -> io::Result<Proc> {
        Self::spawn_in(name, cmd, new_dir(name)?)
    }

    /// Like [`Proc::spawn`], in a temp dir the caller made (and may have written
    /// config files into). The dir lives as long as the `Proc`.
    pub fn spawn_in(name: &str, mut cmd: Command, dir: TempDir) -> io::Result<Proc> {
        let file_name: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let log_path = dir.path().join(format!("{file_name}.log"));
        cmd.stdin(Stdio::null());
        if output_to_terminal() {
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        } else {
            let log = File::create(&log_path)?;
            cmd.stdout(log.try_clone()?).stderr(log);
        }
        // SAFETY: prctl and pthread_sigmask are async-signal-safe and touch no memory
        // of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                // A parent that blocks signals to take them itself (the demo) must
                // not pass that mask on: Envoy would never see SIGTERM.
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = spawn_from_spawner_thread(cmd)?;
        Ok(Proc {
            name: name.to_owned(),
            pid: child.id(),
            child: Mutex::new(child),
            log_path,
            dir_path: dir.path().to_path_buf(),
            dir: Some(dir),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The process's private temp dir (its log, and config files written there).
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process wrote to stdout and stderr so far (lossy UTF-8).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of [`Proc::log`].
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log(), n)
    }

    /// Sends `sig`. Fails (ESRCH) once the process has exited and been reaped, so a
    /// recycled pid is never signalled.
    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        let mut child = self.lock();
        if child.try_wait()?.is_some() {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        let pid = libc::pid_t::try_from(self.pid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
        // SAFETY: plain syscall; the child is not reaped (we hold its lock), so the
        // pid is still ours.
        if unsafe { libc::kill(pid, sig.raw()) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// SIGSTOP, returning once every thread of the process is stopped: the
    /// signal only asks, and a thread busy on another core answers a moment
    /// later, so whatever is sent after this returns meets a frozen process.
    pub fn freeze(&self) -> Result<(), Error> {
        self.signal(Signal::Stop)
            .map_err(|e| self.error(&format!("SIGSTOP: {e}")))?;
        let tasks = format!("/proc/{}/task", self.pid);
        let all_stopped = || {
            let dir = std::fs::read_dir(&tasks).ok()?;
            dir.into_iter()
                .all(|task| {
                    let stat = task
                        .ok()
                        .and_then(|t| std::fs::read_to_string(t.path().join("stat")).ok());
                    // The state follows the command name in parentheses.
                    stat.and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
                        .unwrap_or(false)
                })
                .then_some(())
        };
        crate::poll_until(
            Duration::from_secs(5),
            Duration::from_millis(1),
            all_stopped,
        )
        .ok_or_else(|| self.error("not stopped 5 s after SIGSTOP"))
    }

    /// Waits up to `timeout` for the process to exit; `None` if it still runs.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        crate::poll_until(timeout, Duration::from_millis(5), || self.try_status())
    }

    /// The exit status if the process has exited (reaping it), else `None`.
    pub fn try_status(&self) -> Option<ExitStatus> {
        self.lock().try_wait().ok().flatten()
    }

    pub fn is_running(&self) -> bool {
        self.try_status().is_none()
    }

    /// Resident set size (VmRSS from `/proc/<pid>/status`), or `None` once it exited.
    pub fn rss_bytes(&self) -> Option<u64> {
        if !self.is_running() {
            return None;
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// CPU time the process has used so far, every thread, user and system:
    /// `utime + stime` from `/proc/<pid>/stat`, in clock ticks (`CLK_TCK`,
    /// usually 10 ms). `None` once it exited.
    pub fn cpu_time(&self) -> Option<Duration> {
        if !self.is_running() {
            return None;
        }
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // The command name (field 2) may hold spaces and parentheses: count
        // fields after its last ')'. There, state (field 3) comes first, so
        // utime (field 14) and stime (15) are the 12th and 13th.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
        let used = ticks(11)? + ticks(12)?;
        // SAFETY: sysconf only reads a system constant.
        let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
        (per_second > 0).then(|| Duration::from_micros(used * 1_000_000 / per_second))
    }

    /// Calls `ready` every 20 ms until it returns `Ok`, for up to `timeout`. Fails,
    /// quoting the log and `ready`'s last complaint, if the process exits first or
    /// is still not ready at the deadline (then it is killed).
    pub fn wait_ready(
        &self,
        timeout: Duration,
        mut ready: impl FnMut() -> Result<(), String>,
    ) -> Result<(), Error> {
        let mut last = String::new();
        let outcome = crate::poll_until(timeout, Duration::from_millis(20), || {
            if let Some(status) = self.try_status() {
                return Some(Err(describe_status(status)));
            }
            match ready() {
                Ok(()) => Some(Ok(())),
                Err(why) => {
                    last = why;
                    None
                }
            }
        });
        match outcome {
            Some(Ok(())) => Ok(()),
            Some(Err(how)) => Err(self.error(&format!("{how} before it was ready"))),
            None => {
                self.kill();
                let why = if last.is_empty() {
                    String::new()
                } else {
                    format!(" (last: {last})")
                };
                Err(self.error(&format!("not ready after {timeout:?}{why}")))
            }
        }
    }

    /// SIGTERM (plus SIGCONT, so a frozen process can act on it), up to
    /// [`STOP_GRACE`] to exit, then SIGKILL. Returns the exit status.
    pub fn stop(&self) -> Option<ExitStatus> {
        if let Some(s) = self.try_status() {
            return Some(s);
        }
        let _ = self.signal(Signal::Term);
        let _ = self.signal(Signal::Cont);
        if let Some(s) = self.wait_exit(STOP_GRACE) {
            return Some(s);
        }
        self.kill()
    }

    /// SIGKILL now, and reap. Returns the exit status.
    pub fn kill(&self) -> Option<ExitStatus> {
        let _ = self.signal(Signal::Kill);
        // SIGKILL is not deferrable, except by a process stuck in the kernel.
        self.wait_exit(Duration::from_secs(10))
    }

    /// An [`Error`] that names the process, says `what` went wrong, and quotes the
    /// log tail.
    pub fn error(&self, what: &str) -> Error {
        if output_to_terminal() {
            return Error(format!(
                "{} (pid {}): {what} (its output is above)",
                self.name, self.pid
            ));
        }
        Error(format!(
            "{} (pid {}): {what}\n----- last {PANIC_TAIL_LINES} lines of {} -----\n{}\n----- end of {} log -----",
            self.name,
            self.pid,
            self.log_path.display(),
            self.log_tail(PANIC_TAIL_LINES),
            self.name,
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let status = self.stop();
        let keep = std::env::var_os("E2E_KEEP_LOGS").is_some_and(|v| !v.is_empty());
        if std::thread::panicking() {
            let how = status.map_or_else(|| "still running?".to_owned(), describe_status);
            eprintln!(
                "{}",
                self.error(&format!(
                    "{how}; full log kept in {}",
                    self.dir_path.display()
                ))
            );
        }
        if std::thread::panicking() || keep {
            if let Some(d) = self.dir.take() {
                let _ = d.keep();
            }
        }
    }
}

/// "exited with code 1", "killed by signal 9 (SIGKILL)".
pub fn describe_status(s: ExitStatus) -> String {
    if let Some(code) = s.code() {
        format!("exited with code {code}")
    } else if let Some(sig) = s.signal() {
        let name = match sig {
            libc::SIGKILL => " (SIGKILL)",
            libc::SIGTERM => " (SIGTERM)",
            libc::SIGABRT => " (SIGABRT)",
            libc::SIGSEGV => " (SIGSEGV)",
            libc::SIGINT => " (SIGINT)",
            _ => "",
        };
        let core = if s.core_dumped() { ", core dumped" } else { "" };
        format!("killed by signal {sig}{name}{core}")
    } else {
        format!("{s}")
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A fresh temp dir named after the process, for [`Proc::spawn_in`].
pub fn new_dir(name: &str) -> io::Result<TempDir> {
    let prefix: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    tempfile::Builder::new()
        .prefix(&format!("e2e-{prefix}-"))
        .tempdir()
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Forks `cmd` on a thread that lives as long as the process (see the module docs).
fn spawn_from_spawner_thread(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("e2e-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map_err(|e| eprintln!("e2e: cannot start the spawner thread: {e}"))
            .ok();
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    let sent = tx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx));
    if sent.is_err() {
        return Err(io::Error::other("e2e spawner thread is gone"));
    }
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("e2e spawner thread dropped the request"))?
}
