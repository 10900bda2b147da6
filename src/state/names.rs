//! Compact per-key data kept between syncs: sorted names in one buffer.
//!
//! A live agent keeps a few things per key from one sync to the next (the value digests, the names of
//! the files it wrote, the names its watcher looks for). Kept as one `String` per key, 10,000 keys are
//! 10,000 small allocations made while the sync's transient data (the response, the parsed values) is
//! live; once that is freed, every page still holding one of them stays mapped, since an allocator
//! cannot return a page with a live chunk on it (10,000 keys × 1 KiB: ~6 MiB held that way, see README
//! "Footprint"). These types keep all names in one buffer: a few allocations for any number of keys.

use std::fmt;

/// A set of names in ascending byte order, stored in one string. Lookups are binary searches.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NameSet {
    text: String,
    /// End of each name in `text`.
    ends: Vec<usize>,
}

impl NameSet {
    /// An empty set with room for `names` names of `bytes` bytes in all.
    pub fn with_capacity(names: usize, bytes: usize) -> NameSet {
        NameSet {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(names),
        }
    }

    /// Append `name`, which must sort after every name already in the set (as a `BTreeMap`'s keys do).
    /// Returns false, and changes nothing, for a name out of order or already present.
    pub fn push(&mut self, name: &str) -> bool {
        if self.last().is_some_and(|last| last >= name) {
            return false;
        }
        self.text.push_str(name);
        self.ends.push(self.text.len());
        true
    }

    /// Give back the spare capacity (call once filled).
    pub fn shrink_to_fit(&mut self) {
        self.text.shrink_to_fit();
        self.ends.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The `i`-th name in order; `None` past the end.
    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.text.get(start..end)
    }

    fn last(&self) -> Option<&str> {
        self.get(self.len().checked_sub(1)?)
    }

    /// Where `name` is in the order, if present.
    pub fn position(&self, name: &str) -> Option<usize> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.get(mid)?.cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    pub fn contains(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    /// The names in ascending order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i).unwrap_or_default())
    }
}

impl<S: AsRef<str>> FromIterator<S> for NameSet {
    /// Any order; duplicates are kept once.
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> NameSet {
        let mut names: Vec<S> = iter.into_iter().collect();
        names.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
        let bytes = names.iter().map(|n| n.as_ref().len()).sum();
        let mut set = NameSet::with_capacity(names.len(), bytes);
        for n in &names {
            set.push(n.as_ref());
        }
        set
    }
}

impl fmt::Debug for NameSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// Keyed digest (hex HMAC, see [`crate::sync::value_digest`]) of each selected entry's value, by key:
/// what tells which keys changed from one sync to the next.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Digests {
    keys: NameSet,
    /// The digests, in key order, one after the other.
    digests: String,
    /// End of each digest in `digests`.
    ends: Vec<usize>,
}

impl Digests {
    /// Room for `keys` keys.
    pub fn with_capacity(keys: usize) -> Digests {
        Digests {
            keys: NameSet::with_capacity(keys, keys * 16),
            digests: String::with_capacity(keys * 64),
            ends: Vec::with_capacity(keys),
        }
    }

    /// Append `key` → `digest`; `key` must sort after every key already present (returns false and
    /// changes nothing otherwise).
    pub fn push(&mut self, key: &str, digest: &str) -> bool {
        if !self.keys.push(key) {
            return false;
        }
        self.digests.push_str(digest);
        self.ends.push(self.digests.len());
        true
    }

    pub fn shrink_to_fit(&mut self) {
        self.keys.shrink_to_fit();
        self.digests.shrink_to_fit();
        self.ends.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn digest(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.digests.get(start..end)
    }

    /// The digest of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.digest(self.keys.position(key)?)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.keys.contains(key)
    }

    /// The keys in ascending order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.keys.iter()
    }

    /// `(key, digest)` in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        (0..self.len()).map(|i| {
            (
                self.keys.get(i).unwrap_or_default(),
                self.digest(i).unwrap_or_default(),
            )
        })
    }
}

impl<K: AsRef<str>, D: AsRef<str>> FromIterator<(K, D)> for Digests {
    /// Any order; for a key given twice, the first digest is kept.
    fn from_iter<I: IntoIterator<Item = (K, D)>>(iter: I) -> Digests {
        let mut pairs: Vec<(K, D)> = iter.into_iter().collect();
        pairs.sort_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
        let mut digests = Digests::with_capacity(pairs.len());
        for (k, d) in &pairs {
            digests.push(k.as_ref(), d.as_ref());
        }
        digests
    }
}

impl fmt::Debug for Digests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_order_and_refuse_what_breaks_it() {
        let mut s = NameSet::default();
        assert!(s.push("a") && s.push("b.c") && s.push("bb"));
        assert!(!s.push("b"), "out of order");
        assert!(!s.push("bb"), "duplicate");
        assert_eq!(s.iter().collect::<Vec<_>>(), ["a", "b.c", "bb"]);
        assert_eq!(s.position("bb"), Some(2));
        assert!(s.contains("a") && !s.contains("") && !s.contains("b") && !s.contains("zz"));
        assert_eq!(s.get(3), None);
        let any: NameSet = ["z", "", "é", "a", "z"].into_iter().collect();
        assert_eq!(any.iter().collect::<Vec<_>>(), ["", "a", "z", "é"]);
        assert!(any.contains(""));
        assert!(NameSet::default().position("x").is_none());
    }

    #[test]
    fn digests_map_keys_to_digests() {
        let d: Digests = [("b", "22"), ("a", "1"), ("c", "333"), ("a", "9")]
            .into_iter()
            .collect();
        assert_eq!(d.len(), 3);
        assert_eq!(d.get("a"), Some("1"));
        assert_eq!(d.get("c"), Some("333"));
        assert_eq!(d.get("d"), None);
        assert_eq!(
            d.iter().collect::<Vec<_>>(),
            [("a", "1"), ("b", "22"), ("c", "333")]
        );
        assert_eq!(format!("{d:?}"), r#"{"a": "1", "b": "22", "c": "333"}"#);
    }
}
