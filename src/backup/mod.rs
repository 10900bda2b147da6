//! The OpenSecureConf encrypted backup format (`POST /backup`), in pure Rust.
//!
//! `backup_data` is **standard** base64 (`+/=`) of `salt (32 bytes) || fernet_token`, where the Fernet
//! key is `urlsafe_base64(PBKDF2-HMAC-SHA256(password, salt, 480_000 iterations, 32 bytes))` and the
//! token is the usual url-safe base64 text (`gAAAAA…`). The plaintext is a JSON document:
//!
//! ```json
//! {"version":"2.2.0","backup_id":"backup-…","backup_timestamp":"…Z","total_keys":N,
//!  "configurations":[{"id","key","category","environment","value","created_at","updated_at"},…]}
//! ```
//!
//! Error messages never contain decrypted bytes, the password or the blob, and do not name the file:
//! the caller adds that context.

pub mod inspect;

use std::fmt;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD, URL_SAFE};
use serde::{Deserialize, Serialize};

/// Length of the random salt that prefixes the Fernet token.
pub const SALT_LEN: usize = 32;
/// PBKDF2-HMAC-SHA256 iteration count used by the upstream server.
pub const PBKDF2_ITERATIONS: u32 = 480_000;

/// Fernet token layout: version (1) || timestamp (8) || iv (16) || ciphertext (16·n, n ≥ 1) || hmac (32).
const TOKEN_HEADER_LEN: usize = 1 + 8 + 16;
const TOKEN_HMAC_LEN: usize = 32;
const TOKEN_MIN_LEN: usize = TOKEN_HEADER_LEN + 16 + TOKEN_HMAC_LEN;
/// Lenient decoders (padding optional, trailing bits ignored) so that a cut-off blob is reported as
/// truncated rather than as "not base64"; integrity is checked by the Fernet HMAC anyway.
const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
    .with_decode_padding_mode(DecodePaddingMode::Indifferent)
    .with_decode_allow_trailing_bits(true);
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

/// Fernet rejects tokens dated more than this many seconds in the future.
const FERNET_MAX_CLOCK_SKEW: u64 = 60;

/// A decrypted backup document.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Backup {
    pub version: String,
    pub backup_id: String,
    pub backup_timestamp: String,
    pub total_keys: u64,
    pub configurations: Vec<BackupEntry>,
}

/// One configuration entry of a backup (same fields as `GET /configs?mode=full`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupEntry {
    pub id: i64,
    pub key: String,
    pub category: Option<String>,
    pub environment: String,
    pub value: serde_json::Value,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

impl fmt::Debug for Backup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backup")
            .field("version", &self.version)
            .field("backup_id", &self.backup_id)
            .field("backup_timestamp", &self.backup_timestamp)
            .field("total_keys", &self.total_keys)
            .field("configurations", &self.configurations)
            .finish()
    }
}

/// Shows only the entry's identity: values are secrets and never appear in logs.
impl fmt::Debug for BackupEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackupEntry")
            .field("key", &self.key)
            .field("environment", &self.environment)
            .finish_non_exhaustive()
    }
}

/// Why a backup could not be decrypted. Messages are one line and carry no secret material.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum BackupError {
    /// Nothing but whitespace (or an empty `backup_data`).
    #[error("backup is empty")]
    Empty,
    /// A JSON document without a string `backup_data` field.
    #[error(
        "backup JSON has no string field \"backup_data\" (expected the response of POST /backup)"
    )]
    NoBackupData,
    /// The blob is not standard base64.
    #[error("backup data is not valid standard base64")]
    NotBase64,
    /// Too short for the 32-byte salt and a minimal Fernet token, or cut in the middle.
    #[error("backup data is truncated (too short for a 32-byte salt and a Fernet token)")]
    Truncated,
    /// Structural damage detected before decryption (token encoding, version byte, timestamp).
    /// Fernet refuses tokens dated more than 60 s in the future, so a backup made on a machine
    /// whose clock is ahead also lands here.
    #[error("backup is corrupted: {0}")]
    Corrupted(&'static str),
    /// The HMAC check failed: Fernet cannot tell a wrong password from a damaged token.
    #[error("wrong backup password or corrupted backup (HMAC check failed)")]
    WrongPassword,
    /// Decrypted, but not a backup JSON document (the reason never quotes decrypted bytes).
    #[error("decrypted backup is not an OpenSecureConf backup document ({0})")]
    NotJson(String),
    /// A backup format version other than 2.x (the version text is sanitized).
    #[error("unsupported backup version '{0}' (only 2.x is supported)")]
    UnsupportedVersion(String),
}

/// Encrypts a backup document (the plaintext JSON) under `password`, with a fresh random salt.
///
/// Returns the standard-base64 `backup_data` string, exactly as the upstream `POST /backup` does.
pub fn encrypt(plaintext_json: &[u8], password: &[u8]) -> String {
    let salt = random_salt();
    let fernet = derive_fernet(password, &salt);
    let token = fernet.encrypt(plaintext_json);
    let mut raw = Vec::with_capacity(SALT_LEN + token.len());
    raw.extend_from_slice(&salt);
    raw.extend_from_slice(token.as_bytes());
    STANDARD.encode(raw)
}

/// Decrypts a backup given either the JSON response of `POST /backup` (`{"backup_data": "…", …}`) or
/// the bare base64 blob (surrounding whitespace ignored).
pub fn decrypt(input: &[u8], password: &[u8]) -> Result<Backup, BackupError> {
    let (salt, token) = split_blob(input)?;
    let fernet = derive_fernet(password, &salt);
    let plaintext = fernet
        .decrypt(&token)
        .map_err(|_| BackupError::WrongPassword)?;
    parse_plaintext(&plaintext)
}

/// Everything that can be checked without the (slow) key derivation: framing, base64, token shape.
fn split_blob(input: &[u8]) -> Result<([u8; SALT_LEN], String), BackupError> {
    let input = input.trim_ascii();
    if input.is_empty() {
        return Err(BackupError::Empty);
    }
    let blob: Vec<u8> = if input.first() == Some(&b'{') {
        let response: serde_json::Value =
            serde_json::from_slice(input).map_err(|_| BackupError::NoBackupData)?;
        match response.get("backup_data") {
            Some(serde_json::Value::String(data)) => data.trim().as_bytes().to_vec(),
            _ => return Err(BackupError::NoBackupData),
        }
    } else {
        input.to_vec()
    };
    if blob.is_empty() {
        return Err(BackupError::Empty);
    }
    // Tolerate line-wrapped blobs (e.g. pasted from `base64 -w 76`).
    let blob: Vec<u8> = blob
        .into_iter()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let raw = STANDARD_LENIENT.decode(&blob).map_err(|err| match err {
        base64::DecodeError::InvalidLength(_) => BackupError::Truncated,
        _ => BackupError::NotBase64,
    })?;
    if raw.len() <= SALT_LEN {
        return Err(BackupError::Truncated);
    }
    let (salt, token) = raw.split_at(SALT_LEN);
    let token = std::str::from_utf8(token)
        .map_err(|_| BackupError::Corrupted("Fernet token is not ASCII text"))?;
    check_token_shape(token)?;
    let mut salt_arr = [0u8; SALT_LEN];
    salt_arr.copy_from_slice(salt);
    Ok((salt_arr, token.to_owned()))
}

/// Validates the Fernet token structure so that damage is reported precisely (the Fernet crate
/// reports every problem as the same opaque error).
fn check_token_shape(token: &str) -> Result<(), BackupError> {
    let bytes = URL_SAFE_LENIENT.decode(token).map_err(|err| match err {
        base64::DecodeError::InvalidLength(_) => BackupError::Truncated,
        _ => BackupError::Corrupted("Fernet token is not url-safe base64"),
    })?;
    if bytes.len() < TOKEN_MIN_LEN {
        return Err(BackupError::Truncated);
    }
    if bytes[0] != 0x80 {
        return Err(BackupError::Corrupted("unknown Fernet version byte"));
    }
    if !(bytes.len() - TOKEN_HEADER_LEN - TOKEN_HMAC_LEN).is_multiple_of(16) {
        return Err(BackupError::Truncated);
    }
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&bytes[1..9]);
    let timestamp = u64::from_be_bytes(ts);
    let now = jiff::Timestamp::now().as_second().max(0).unsigned_abs();
    if timestamp > now.saturating_add(FERNET_MAX_CLOCK_SKEW) {
        return Err(BackupError::Corrupted(
            "Fernet token is dated in the future (check the clocks)",
        ));
    }
    Ok(())
}

/// The decrypted document, each configuration's value still as JSON text: values are parsed one by one
/// like a listing's (`state::parse_value`: numbers exactly as written, no recursion limit failing the
/// whole backup).
#[derive(Deserialize)]
struct RawBackup<'a> {
    backup_id: String,
    backup_timestamp: String,
    total_keys: u64,
    #[serde(borrow)]
    configurations: Vec<RawEntry<'a>>,
}

#[derive(Deserialize)]
struct RawEntry<'a> {
    id: i64,
    key: String,
    category: Option<String>,
    environment: String,
    #[serde(borrow)]
    value: &'a serde_json::value::RawValue,
    created_at: Option<String>,
    updated_at: Option<String>,
}

/// Only the version, every other field skipped unparsed.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    version: Option<&'a serde_json::value::RawValue>,
}

fn parse_plaintext(plaintext: &[u8]) -> Result<Backup, BackupError> {
    let head: Head<'_> = serde_json::from_slice(plaintext)
        .map_err(|e| BackupError::NotJson(format!("invalid JSON at line {}", e.line())))?;
    let version = match head
        .version
        .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
    {
        Some(v) => v,
        None => return Err(BackupError::NotJson("no \"version\" field".into())),
    };
    if version.split('.').next() != Some("2") {
        return Err(BackupError::UnsupportedVersion(sanitize_version(&version)));
    }
    // Shape errors from serde can quote decrypted values: report only the category.
    let raw: RawBackup<'_> = serde_json::from_slice(plaintext)
        .map_err(|_| BackupError::NotJson("missing or mistyped backup fields".into()))?;
    let mut configurations = Vec::with_capacity(raw.configurations.len());
    for e in raw.configurations {
        match crate::state::parse_value(e.value.get()) {
            Ok(value) => configurations.push(BackupEntry {
                id: e.id,
                key: e.key,
                category: e.category,
                environment: e.environment,
                value,
                created_at: e.created_at,
                updated_at: e.updated_at,
            }),
            Err(why) => tracing::warn!(
                "backup: key '{}' of environment '{}' skipped: {why} (other keys are used)",
                crate::util::Escaped(&e.key),
                crate::util::Escaped(&e.environment)
            ),
        }
    }
    Ok(Backup {
        version,
        backup_id: raw.backup_id,
        backup_timestamp: raw.backup_timestamp,
        total_keys: raw.total_keys,
        configurations,
    })
}

/// Keeps only a short, harmless rendering of a version string for error messages.
fn sanitize_version(version: &str) -> String {
    version
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+'))
        .take(32)
        .collect()
}

fn derive_fernet(password: &[u8], salt: &[u8]) -> fernet::Fernet {
    let key = pbkdf2::pbkdf2_hmac_array::<sha2::Sha256, 32>(password, salt, PBKDF2_ITERATIONS);
    let encoded = URL_SAFE.encode(key);
    // A 32-byte url-safe base64 key is always accepted by `Fernet::new`.
    fernet::Fernet::new(&encoded).expect("32-byte Fernet key")
}

/// 32 bytes from the operating system's CSPRNG (through the Fernet crate's key generator).
pub(crate) fn random_salt() -> [u8; SALT_LEN] {
    let key = fernet::Fernet::generate_key();
    let bytes = URL_SAFE
        .decode(key)
        .expect("Fernet::generate_key returns url-safe base64");
    let mut salt = [0u8; SALT_LEN];
    salt.copy_from_slice(&bytes[..SALT_LEN]);
    salt
}

#[cfg(test)]
mod tests;
