//! Keyed content hashes: every hash of configuration content that leaves the process (`/status`, log
//! lines, the `osc-agent.io/content-hash` and `osc-agent.io/config-hash` annotations, the
//! `X-Osc-Content-Hash` header, `$OSC_CONTENT_HASH`) is an HMAC-SHA256, never a plain digest, so nobody
//! who sees a hash can test guesses of a value offline.
//!
//! The HMAC key is derived from the user key (or, with `--from-backup`, from the backup password):
//! `HMAC-SHA256(user key, "osc-agent content hash v1")`. Every replica holding the same user key computes
//! the same hashes (so a rollout restart stays one rollout); without the user key a hash tells nothing
//! about the values. Testing guesses of the user key itself against a published hash would need every
//! value of the environment, and the user key already withstands the server's own (online) checks; a
//! slow derivation would only add start-up cost.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Secret;

const LABEL: &[u8] = b"osc-agent content hash v1";

/// Computes keyed hashes (lower-case hex HMAC-SHA256). `Debug` never shows the key. Clones share the
/// key: [`ContentHasher::rekey`] (after a user-key rotation) changes it for all of them.
#[derive(Clone)]
pub struct ContentHasher {
    key: std::sync::Arc<std::sync::RwLock<[u8; 32]>>,
}

impl fmt::Debug for ContentHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ContentHasher(<keyed>)")
    }
}

impl ContentHasher {
    /// Derive the hashing key from a credential (the user key, or the backup password).
    pub fn derive(secret: &Secret) -> ContentHasher {
        ContentHasher::with_key(derive_key(secret))
    }

    /// A hasher with a fixed key, for unit tests and benchmarks (no derivation cost).
    pub fn with_key(key: [u8; 32]) -> ContentHasher {
        ContentHasher {
            key: std::sync::Arc::new(std::sync::RwLock::new(key)),
        }
    }

    /// Derive the key again from `secret` (the current user key): replicas that read a rotated key
    /// agree again without a restart. Every clone of this hasher uses the new key from now on.
    pub fn rekey(&self, secret: &Secret) {
        let key = derive_key(secret);
        let mut current = self.key.write().unwrap_or_else(|p| p.into_inner());
        *current = key;
    }

    /// Hex HMAC of a sequence of fields, each length-prefixed so that field boundaries cannot shift.
    pub fn fields<'a>(&self, fields: impl IntoIterator<Item = &'a [u8]>) -> String {
        let mut mac = self.mac();
        for f in fields {
            mac.update(&(f.len() as u64).to_le_bytes());
            mac.update(f);
        }
        hex::encode(mac.finalize().into_bytes())
    }

    /// Hex HMAC of one byte string.
    pub fn hex(&self, bytes: &[u8]) -> String {
        self.fields([bytes])
    }

    fn mac(&self) -> Hmac<Sha256> {
        let key = *self.key.read().unwrap_or_else(|p| p.into_inner());
        // HMAC takes keys of any length: this cannot fail.
        <Hmac<Sha256> as Mac>::new_from_slice(&key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"))
    }
}

fn derive_key(secret: &Secret) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(LABEL);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rekeying_changes_every_clone_like_a_fresh_derivation() {
        let (old, new) = (Secret::new("old-key".into()), Secret::new("new-key".into()));
        let h = ContentHasher::derive(&old);
        let clone = h.clone();
        let before = clone.hex(b"v");
        h.rekey(&new);
        assert_ne!(clone.hex(b"v"), before);
        assert_eq!(clone.hex(b"v"), ContentHasher::derive(&new).hex(b"v"));
    }

    #[test]
    fn keyed_and_stable() {
        let a = ContentHasher::with_key([1; 32]);
        let b = ContentHasher::with_key([2; 32]);
        assert_eq!(a.hex(b"x"), a.hex(b"x"));
        assert_ne!(a.hex(b"x"), b.hex(b"x"));
        assert_ne!(a.fields([&b"ab"[..], b"c"]), a.fields([&b"a"[..], b"bc"]));
        // Not the plain SHA-256 of the input.
        assert_ne!(a.hex(b"x"), crate::util::sha256_hex(b"x"));
        let k = Secret::new("integration-user-key-42".into());
        assert_eq!(
            ContentHasher::derive(&k).hex(b"x"),
            ContentHasher::derive(&k).hex(b"x")
        );
        assert!(!format!("{:?}", ContentHasher::derive(&k)).contains("integration"));
    }
}
