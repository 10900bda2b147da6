//! Timestamps in the exact textual forms the upstream (Python) server uses.

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::{Timestamp, Zoned};

/// `created_at` / `updated_at` / `backup_timestamp`: UTC, microseconds, literal `Z`
/// (`2026-11-23T05:00:14.814411Z`).
pub fn utc_z() -> String {
    let now = Timestamp::now().to_zoned(TimeZone::UTC).datetime();
    format!("{}.{:06}Z", date_time(now, 'T'), micros(now))
}

/// SSE `timestamp`, `server_time` and the `: keep-alive` comment: Python's
/// `datetime.now().isoformat()`, i.e. server **local** time without offset, microseconds omitted when
/// they are zero (`2026-11-23T05:00:10.528382`).
pub fn local_naive() -> String {
    python_iso(Zoned::now().datetime(), 'T')
}

/// The `: ping - …` comment of sse-starlette: `str(datetime.now(timezone.utc))`
/// (`2026-11-23 05:00:46.068931+00:00`).
pub fn utc_ping() -> String {
    let now = Timestamp::now().to_zoned(TimeZone::UTC).datetime();
    format!("{}+00:00", python_iso(now, ' '))
}

/// The SQLite text form of a stored timestamp, as `GET /cluster/configs` shows it: the database's
/// own `YYYY-MM-DD HH:MM:SS.ffffff` (UTC, always six fraction digits, no `T`, no zone), from the
/// REST form [`utc_z`] writes. Text that is not a timestamp (a hand-edited data file) is only
/// stripped of its `T` and `Z`.
pub fn sqlite_text(rest: &str) -> String {
    match rest.parse::<Timestamp>() {
        Ok(ts) => {
            let dt = ts.to_zoned(TimeZone::UTC).datetime();
            format!("{}.{:06}", date_time(dt, ' '), micros(dt))
        }
        Err(_) => rest.trim_end_matches('Z').replacen('T', " ", 1),
    }
}

/// Seconds since the Unix epoch (the upstream `backup_id` is `backup-<seconds>`).
pub fn unix_seconds() -> i64 {
    Timestamp::now().as_second()
}

fn python_iso(dt: DateTime, sep: char) -> String {
    match micros(dt) {
        0 => date_time(dt, sep),
        us => format!("{}.{us:06}", date_time(dt, sep)),
    }
}

fn date_time(dt: DateTime, sep: char) -> String {
    format!(
        "{:04}-{:02}-{:02}{sep}{:02}:{:02}:{:02}",
        dt.year(),
        dt.month(),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

fn micros(dt: DateTime) -> i32 {
    dt.subsec_nanosecond() / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_forms() {
        let dt = jiff::civil::date(2026, 11, 23).at(5, 0, 46, 68_931_000);
        assert_eq!(python_iso(dt, 'T'), "2026-11-23T05:00:46.068931");
        assert_eq!(python_iso(dt, ' '), "2026-11-23 05:00:46.068931");
        let whole = jiff::civil::date(2026, 1, 2).at(3, 4, 5, 0);
        assert_eq!(python_iso(whole, 'T'), "2026-01-02T03:04:05");
        let z = utc_z();
        assert_eq!(z.len(), "2026-11-23T05:00:14.814411Z".len(), "{z}");
        assert!(z.ends_with('Z'));
        assert!(utc_ping().ends_with("+00:00"));
        assert_eq!(
            sqlite_text("2026-11-30T17:22:26.925663Z"),
            "2026-11-30 17:22:26.925663"
        );
        assert_eq!(
            sqlite_text("2026-11-30T17:22:26Z"),
            "2026-11-30 17:22:26.000000"
        );
        assert_eq!(sqlite_text("yesterdayTnoonZ"), "yesterday noon");
        let now = utc_z();
        assert_eq!(sqlite_text(&now), now.replace('T', " ").replace('Z', ""));
    }
}
