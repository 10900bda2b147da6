//! Compact per-key data kept between syncs: sorted names in one buffer.
//!
//! A live agent keeps a few things per key from one sync to the next (the value digests, the names of
//! the files it wrote, the names its watcher looks for). Kept as one `String` per key, 10,000 keys are
//! 10,000 small allocations made while the sync's transient data (the response, the parsed values) is
//! live; once that is freed, every page still holding one of them stays mapped, since an allocator
//! cannot return a page with a live chunk on it (10,000 keys × 1 KiB: ~6 MiB held that way, see README
//! "Footprint"). These types keep all names in one buffer: a few allocations for any number of keys.

use std::fmt;

use std::ops::Range;

/// The span of item `i` in a buffer where `ends[i]` is where item `i` ends.
fn span(ends: &[usize], i: usize) -> Option<Range<usize>> {
    let end = *ends.get(i)?;
    let start = match i.checked_sub(1) {
        Some(before) => *ends.get(before)?,
        None => 0,
    };
    Some(start..end)
}

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
        self.text.get(span(&self.ends, i)?)
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

/// Name → bytes, in name order: the names in one [`NameSet`], the values one after the other in one
/// buffer. The files of `--output-dir` (`render::DirFiles`) and, through [`Digests`], the value digests.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NameMap {
    names: NameSet,
    data: Vec<u8>,
    /// End of each value in `data`.
    ends: Vec<usize>,
}

impl NameMap {
    /// Room for `names` entries whose names and values take `name_bytes` and `value_bytes` in all.
    pub fn with_capacity(names: usize, name_bytes: usize, value_bytes: usize) -> NameMap {
        NameMap {
            names: NameSet::with_capacity(names, name_bytes),
            data: Vec::with_capacity(value_bytes),
            ends: Vec::with_capacity(names),
        }
    }

    /// Append `name` → `value`; `name` must sort after every name already present (returns false and
    /// changes nothing otherwise).
    pub fn push(&mut self, name: &str, value: &[u8]) -> bool {
        if !self.names.push(name) {
            return false;
        }
        self.data.extend_from_slice(value);
        self.ends.push(self.data.len());
        true
    }

    /// Give back the spare capacity (call once filled).
    pub fn shrink_to_fit(&mut self) {
        self.names.shrink_to_fit();
        self.data.shrink_to_fit();
        self.ends.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    fn value(&self, i: usize) -> &[u8] {
        span(&self.ends, i)
            .and_then(|r| self.data.get(r))
            .unwrap_or_default()
    }

    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.names.position(name).map(|i| self.value(i))
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// The names in order.
    pub fn names(&self) -> &NameSet {
        &self.names
    }

    /// `(name, value)` in name order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &[u8])> + '_ {
        self.names
            .iter()
            .enumerate()
            .map(|(i, n)| (n, self.value(i)))
    }
}

impl<S: AsRef<str>, B: AsRef<[u8]>> FromIterator<(S, B)> for NameMap {
    /// Any order; for a name given twice, the first is kept.
    fn from_iter<I: IntoIterator<Item = (S, B)>>(iter: I) -> NameMap {
        let mut pairs: Vec<(S, B)> = iter.into_iter().collect();
        pairs.sort_by(|a, b| a.0.as_ref().cmp(b.0.as_ref()));
        let mut map = NameMap::default();
        for (name, value) in &pairs {
            map.push(name.as_ref(), value.as_ref());
        }
        map.shrink_to_fit();
        map
    }
}

/// Keyed digest (hex HMAC, see [`crate::sync::value_digest`]) of each selected entry's value, by key:
/// what tells which keys changed from one sync to the next. A [`NameMap`] of text.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Digests(NameMap);

impl Digests {
    /// Room for `keys` keys.
    pub fn with_capacity(keys: usize) -> Digests {
        Digests(NameMap::with_capacity(keys, keys * 16, keys * 64))
    }

    /// Append `key` → `digest`; `key` must sort after every key already present (returns false and
    /// changes nothing otherwise).
    pub fn push(&mut self, key: &str, digest: &str) -> bool {
        self.0.push(key, digest.as_bytes())
    }

    pub fn shrink_to_fit(&mut self) {
        self.0.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The digest of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(text)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// The keys in ascending order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.0.names().iter()
    }

    /// `(key, digest)` in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.0.iter().map(|(k, d)| (k, text(d)))
    }
}

/// Digests are only ever pushed as text.
fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

impl<K: AsRef<str>, D: AsRef<str>> FromIterator<(K, D)> for Digests {
    /// Any order; for a key given twice, the first digest is kept.
    fn from_iter<I: IntoIterator<Item = (K, D)>>(iter: I) -> Digests {
        let pairs: Vec<(K, D)> = iter.into_iter().collect();
        Digests(
            pairs
                .iter()
                .map(|(k, d)| (k.as_ref(), d.as_ref().as_bytes()))
                .collect(),
        )
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

    #[test]
    fn name_maps_keep_values_by_name() {
        let m: NameMap = [("b", &b"2"[..]), ("a", b""), ("c", b"333")]
            .into_iter()
            .collect();
        assert_eq!(m.get("a"), Some(&b""[..]));
        assert_eq!(m.get("c"), Some(&b"333"[..]));
        assert_eq!(m.get("d"), None);
        assert_eq!(
            m.iter().collect::<Vec<_>>(),
            [("a", &b""[..]), ("b", b"2"), ("c", b"333")]
        );
        let mut m = m;
        assert!(!m.push("b", b"x"), "out of order");
        assert_eq!(m.len(), 3);
    }
}
