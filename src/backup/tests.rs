//! Tests for the backup format. Key derivation (480k PBKDF2 rounds) is slow in debug builds, so only a
//! handful of tests derive a key; every other error case fails before derivation.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::*;

const FIXTURE_PASSWORD: &[u8] = b"fixture-backup-password";

fn fixtures_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upstream");
    assert!(
        dir.is_dir(),
        "fixture directory {} is missing: the interoperability tests need it",
        dir.display()
    );
    dir
}

fn read_fixture(name: &str) -> Vec<u8> {
    let path = fixtures_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `upstream-list-all.json`, indexed by (environment, key).
fn listed_entries() -> BTreeMap<(String, String), BackupEntry> {
    let entries: Vec<BackupEntry> =
        serde_json::from_slice(&read_fixture("upstream-list-all.json")).expect("list fixture");
    entries
        .into_iter()
        .map(|e| ((e.environment.clone(), e.key.clone()), e))
        .collect()
}

fn assert_matches_listing(backup: &Backup, environments: &[&str]) {
    let listed: BTreeMap<_, _> = listed_entries()
        .into_iter()
        .filter(|((env, _), _)| environments.contains(&env.as_str()))
        .collect();
    assert_eq!(backup.total_keys as usize, backup.configurations.len());
    assert_eq!(backup.configurations.len(), listed.len());
    for entry in &backup.configurations {
        let want = listed
            .get(&(entry.environment.clone(), entry.key.clone()))
            .unwrap_or_else(|| panic!("unexpected entry {entry:?}"));
        assert_eq!(entry.value, want.value, "value of {entry:?}");
        assert_eq!(entry.category, want.category, "category of {entry:?}");
    }
}

#[test]
fn decrypts_upstream_backup_of_all_environments() {
    let backup = decrypt(&read_fixture("upstream-backup-all.json"), FIXTURE_PASSWORD).unwrap();
    assert_eq!(backup.version, "2.2.0");
    assert!(backup.backup_id.starts_with("backup-"));
    assert!(backup.backup_timestamp.ends_with('Z'));
    assert_matches_listing(&backup, &["production", "staging"]);
}

#[test]
fn decrypts_upstream_backup_of_one_environment_from_bare_blob() {
    let response: serde_json::Value =
        serde_json::from_slice(&read_fixture("upstream-backup-production.json")).unwrap();
    let blob = format!("\n  {}\n", response["backup_data"].as_str().unwrap());
    let backup = decrypt(blob.as_bytes(), FIXTURE_PASSWORD).unwrap();
    assert_matches_listing(&backup, &["production"]);
}

#[test]
fn round_trip_and_wrong_password() {
    let doc = serde_json::json!({
        "version": "2.2.0",
        "backup_id": "backup-1",
        "backup_timestamp": "2026-11-23T06:21:45.976338Z",
        "total_keys": 1,
        "configurations": [{
            "id": 7, "key": "k", "category": null, "environment": "dev",
            "value": {"nested": [1, 2.5, null]},
            "created_at": "2026-11-23T06:21:45.338973Z", "updated_at": "2026-11-23T06:21:45.338973Z"
        }]
    });
    let plaintext = serde_json::to_vec(&doc).unwrap();
    let blob = encrypt(&plaintext, b"pw-1");
    assert!(STANDARD.decode(&blob).unwrap()[SALT_LEN..].starts_with(b"gAAAAA"));
    let backup = decrypt(blob.as_bytes(), b"pw-1").unwrap();
    assert_eq!(serde_json::to_value(&backup).unwrap(), doc);

    let err = decrypt(blob.as_bytes(), b"pw-2").unwrap_err();
    assert_eq!(err, BackupError::WrongPassword);
    assert_eq!(
        err.to_string(),
        "wrong backup password or corrupted backup (HMAC check failed)"
    );
}

#[test]
fn flipped_token_byte_fails_the_hmac_check() {
    let response: serde_json::Value =
        serde_json::from_slice(&read_fixture("upstream-backup-production.json")).unwrap();
    let mut raw = STANDARD
        .decode(response["backup_data"].as_str().unwrap())
        .unwrap();
    // Flip a ciphertext character of the token text, staying inside the url-safe alphabet.
    let i = SALT_LEN + 60;
    raw[i] = if raw[i] == b'A' { b'B' } else { b'A' };
    let err = decrypt(STANDARD.encode(raw).as_bytes(), FIXTURE_PASSWORD).unwrap_err();
    assert_eq!(err, BackupError::WrongPassword);
}

#[test]
fn errors_detected_before_key_derivation() {
    let good = read_fixture("upstream-backup-all.json");
    let response: serde_json::Value = serde_json::from_slice(&good).unwrap();
    let blob = response["backup_data"].as_str().unwrap();
    let raw = STANDARD.decode(blob).unwrap();

    let cases: Vec<(Vec<u8>, BackupError)> = vec![
        (b"".to_vec(), BackupError::Empty),
        (b" \n\t".to_vec(), BackupError::Empty),
        (br#"{"backup_data": ""}"#.to_vec(), BackupError::Empty),
        (br#"{"total_keys": 1}"#.to_vec(), BackupError::NoBackupData),
        (br#"{"backup_data": 5"#.to_vec(), BackupError::NoBackupData),
        (b"not base64 at all!".to_vec(), BackupError::NotBase64),
        (
            STANDARD.encode(&raw[..20]).into_bytes(),
            BackupError::Truncated,
        ),
        (
            STANDARD.encode(&raw[..SALT_LEN]).into_bytes(),
            BackupError::Truncated,
        ),
        (
            STANDARD.encode(&raw[..SALT_LEN + 50]).into_bytes(),
            BackupError::Truncated,
        ),
        (
            blob.as_bytes()[..blob.len() - 3].to_vec(),
            BackupError::Truncated,
        ),
    ];
    for (input, want) in cases {
        let got = decrypt(&input, b"irrelevant").unwrap_err();
        assert_eq!(got, want, "input {:?}", String::from_utf8_lossy(&input));
    }

    // A damaged version byte: `gAAAAA` becomes `AAAAAA`.
    let mut damaged = raw.clone();
    damaged[SALT_LEN] = b'A';
    let err = decrypt(STANDARD.encode(damaged).as_bytes(), b"irrelevant").unwrap_err();
    assert!(matches!(err, BackupError::Corrupted(_)), "{err:?}");
}

#[test]
fn plaintext_validation() {
    assert!(matches!(
        parse_plaintext(b"secret-not-json"),
        Err(BackupError::NotJson(_))
    ));
    let err = parse_plaintext(br#"{"version":"3.0.0","configurations":[]}"#).unwrap_err();
    assert_eq!(err, BackupError::UnsupportedVersion("3.0.0".into()));
    let err = parse_plaintext(
        br#"{"version":"2.2.0","backup_id":"b","backup_timestamp":"t","total_keys":"top-secret","configurations":[]}"#,
    )
    .unwrap_err();
    assert!(!err.to_string().contains("top-secret"), "{err}");
    assert!(matches!(err, BackupError::NotJson(_)));
    let err =
        parse_plaintext(br#"{"version":"9\n\u0000secret-ish-but-very-long-version-string-here"}"#)
            .unwrap_err();
    assert!(!err.to_string().contains('\n'));
}

#[test]
fn debug_never_shows_values() {
    let entry = BackupEntry {
        id: 1,
        key: "db".into(),
        category: Some("database".into()),
        environment: "prod".into(),
        value: serde_json::json!({"password": "hunter2"}),
        created_at: None,
        updated_at: None,
    };
    let backup = Backup {
        version: "2.2.0".into(),
        backup_id: "backup-1".into(),
        backup_timestamp: "t".into(),
        total_keys: 1,
        configurations: vec![entry],
    };
    let shown = format!("{backup:?}");
    assert!(
        shown.contains("\"db\"") && shown.contains("\"prod\""),
        "{shown}"
    );
    assert!(!shown.contains("hunter2"), "{shown}");
}

/// Values are parsed one by one like a listing's: numbers keep their digits and spelling, and one value
/// nested too deep is skipped alone instead of failing the whole backup.
#[test]
fn values_keep_their_numbers_and_a_too_deep_one_is_skipped_alone() {
    let deep = format!("{}1{}", "[".repeat(5000), "]".repeat(5000));
    let entry = |id: u32, key: &str, value: &str| {
        format!(
            r#"{{"id": {id}, "key": "{key}", "category": null, "environment": "prod", "value": {value}, "created_at": null, "updated_at": null}}"#
        )
    };
    let plaintext = format!(
        r#"{{"version": "2.2.0", "backup_id": "b", "backup_timestamp": "t", "total_keys": 3, "configurations": [{}, {}, {}]}}"#,
        entry(
            1,
            "big",
            r#"{"n": 123456789012345678901234567890, "e": 1E5, "f": 0.1}"#
        ),
        entry(2, "deep", &deep),
        entry(3, "plain", r#""text""#),
    );
    let backup = parse_plaintext(plaintext.as_bytes()).expect("the backup parses");
    let keys: Vec<&str> = backup
        .configurations
        .iter()
        .map(|e| e.key.as_str())
        .collect();
    assert_eq!(keys, ["big", "plain"]);
    assert_eq!(
        serde_json::to_string(&backup.configurations[0].value).unwrap(),
        r#"{"n":123456789012345678901234567890,"e":1E5,"f":0.1}"#
    );
}
