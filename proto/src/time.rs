//! Wall-clock timestamps on the wire.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;

/// Unix nanoseconds to a protobuf timestamp.
pub fn from_unix_nanos(ns: i128) -> Timestamp {
    // Every time until 2262 fits in i64, whose division is one instruction; i128's is a call.
    if let Ok(ns) = i64::try_from(ns) {
        return Timestamp {
            seconds: ns.div_euclid(1_000_000_000),
            nanos: ns.rem_euclid(1_000_000_000) as i32,
        };
    }
    Timestamp {
        seconds: ns.div_euclid(1_000_000_000) as i64,
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

/// Unix milliseconds to a protobuf timestamp.
pub fn from_unix_millis(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A protobuf timestamp to Unix milliseconds, truncated toward zero like
/// `to_unix_nanos(ts) / 1_000_000` (in i64 arithmetic when it fits, which is every sane time).
pub fn to_unix_millis(ts: &Timestamp) -> i64 {
    match ts
        .seconds
        .checked_mul(1_000_000_000)
        .and_then(|ns| ns.checked_add(i64::from(ts.nanos)))
    {
        Some(ns) => ns / 1_000_000,
        None => (to_unix_nanos(ts) / 1_000_000) as i64,
    }
}

/// A protobuf timestamp to Unix nanoseconds.
pub fn to_unix_nanos(ts: &Timestamp) -> i128 {
    i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos)
}

/// The current UTC wall clock.
pub fn now() -> Timestamp {
    from_system_time(SystemTime::now())
}

pub fn from_system_time(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => from_unix_nanos(d.as_nanos() as i128),
        Err(e) => from_unix_nanos(-(e.duration().as_nanos() as i128)),
    }
}

pub fn to_system_time(ts: &Timestamp) -> SystemTime {
    let ns = to_unix_nanos(ts);
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs() as u64)
    }
}

/// RFC 3339 rendering with microseconds, UTC.
pub fn rfc3339(ts: &Timestamp) -> String {
    let ns = to_unix_nanos(ts);
    let secs = ns.div_euclid(1_000_000_000) as i64;
    let micros = (ns.rem_euclid(1_000_000_000) / 1000) as u32;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn conversions_agree_across_the_range() {
        use super::*;
        for ns in [
            0i128,
            1,
            -1,
            999_999_999,
            -1_000_000_001,
            1_764_000_000_123_456_789,
            i128::from(i64::MAX),
            i128::from(i64::MIN),
            i128::from(i64::MAX) * 3,
            -i128::from(i64::MAX) * 3,
        ] {
            let t = from_unix_nanos(ns);
            assert!((0..1_000_000_000).contains(&t.nanos), "{ns}");
            assert_eq!(to_unix_nanos(&t), ns);
        }
        for (seconds, nanos) in [
            (1_764_000_000, 123_456_789),
            (-5, 999_999_999),
            (3, -7),
            (i64::MAX, 999_999_999),
            (i64::MIN, -999_999_999),
        ] {
            let t = Timestamp { seconds, nanos };
            assert_eq!(
                to_unix_millis(&t),
                (to_unix_nanos(&t) / 1_000_000) as i64,
                "{t:?}"
            );
        }
        for ms in [0i64, 1, -1, 1_764_000_000_123, -1_764_000_000_999] {
            assert_eq!(
                from_unix_millis(ms),
                from_unix_nanos(i128::from(ms) * 1_000_000)
            );
        }
    }

    use super::*;

    #[test]
    fn round_trips_and_renders() {
        let ts = from_unix_nanos(1_764_000_000_123_456_789);
        assert_eq!(to_unix_nanos(&ts), 1_764_000_000_123_456_789);
        assert_eq!(rfc3339(&ts), "2025-11-24T16:00:00.123456Z");
        assert_eq!(rfc3339(&from_unix_nanos(0)), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(&from_unix_nanos(951_782_400_000_000_000)),
            "2000-02-29T00:00:00.000000Z"
        );
        let neg = from_unix_nanos(-1);
        assert_eq!((neg.seconds, neg.nanos), (-1, 999_999_999));
        assert_eq!(
            to_system_time(&from_system_time(UNIX_EPOCH + Duration::from_secs(5))),
            UNIX_EPOCH + Duration::from_secs(5)
        );
    }
}
