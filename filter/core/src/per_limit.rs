//! One value per limit of a key (a TAT, a limit's state in a decision, a
//! reset in a Redis reply), in a fixed-capacity list: a key carries at most
//! [`MAX_LIMITS`] limits, so deciding never allocates.

use std::fmt;

/// How many limits one key may carry at once (`["10/s", "1000/day"]` is two).
pub const MAX_LIMITS: usize = 16;

/// Up to [`MAX_LIMITS`] values, in the order of the limits they belong to.
#[derive(Clone, Copy)]
pub struct PerLimit<T> {
    values: [T; MAX_LIMITS],
    len: usize,
}

impl<T: Copy + Default> PerLimit<T> {
    pub fn new() -> PerLimit<T> {
        PerLimit {
            values: [T::default(); MAX_LIMITS],
            len: 0,
        }
    }

    /// `f(0), f(1), ...`: `len` values, at most [`MAX_LIMITS`].
    pub fn from_fn(len: usize, f: impl FnMut(usize) -> T) -> PerLimit<T> {
        (0..len).map(f).collect()
    }

    /// Appends `value`; `false`, and nothing changes, when the list is full.
    pub fn push(&mut self, value: T) -> bool {
        match self.values.get_mut(self.len) {
            Some(slot) => {
                *slot = value;
                self.len += 1;
                true
            }
            None => false,
        }
    }
}

impl<T> PerLimit<T> {
    pub fn as_slice(&self) -> &[T] {
        self.values.get(..self.len).unwrap_or(&[])
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        self.values.get_mut(..self.len).unwrap_or(&mut [])
    }

    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.as_slice().iter()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T: Copy + Default> Default for PerLimit<T> {
    fn default() -> PerLimit<T> {
        PerLimit::new()
    }
}

/// Keeps the first [`MAX_LIMITS`] values; the rest are dropped.
impl<T: Copy + Default> FromIterator<T> for PerLimit<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> PerLimit<T> {
        let mut out = PerLimit::new();
        for value in iter.into_iter().take(MAX_LIMITS) {
            out.push(value);
        }
        out
    }
}

impl<'a, T> IntoIterator for &'a PerLimit<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Equal when the values held are; the unused capacity does not count.
impl<T: PartialEq> PartialEq for PerLimit<T> {
    fn eq(&self, other: &PerLimit<T>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Eq> Eq for PerLimit<T> {}

impl<T: std::hash::Hash> std::hash::Hash for PerLimit<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl<T: fmt::Debug> fmt::Debug for PerLimit<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_up_to_max_limits_values_in_order() {
        let mut list = PerLimit::new();
        assert!(list.is_empty());
        for i in 0..MAX_LIMITS as u64 {
            assert!(list.push(i));
        }
        assert!(!list.push(99), "a full list refuses more");
        assert_eq!(list.len(), MAX_LIMITS);
        assert_eq!(list.as_slice(), (0..MAX_LIMITS as u64).collect::<Vec<_>>());
        list.as_mut_slice()[0] = 10;
        assert_eq!(list.iter().next(), Some(&10));
    }

    #[test]
    fn collecting_keeps_the_first_max_limits_and_equality_ignores_spare_capacity() {
        let many: PerLimit<u64> = (0..20).collect();
        assert_eq!(many.len(), MAX_LIMITS);
        assert_eq!(
            PerLimit::from_fn(3, |i| i as u64 * 2).as_slice(),
            &[0, 2, 4]
        );
        let mut a: PerLimit<u64> = [1, 2].into_iter().collect();
        let b: PerLimit<u64> = [1, 2].into_iter().collect();
        assert_eq!(a, b);
        a.push(3);
        assert_ne!(a, b);
        assert_eq!(format!("{b:?}"), "[1, 2]");
    }
}
