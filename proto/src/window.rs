//! Query windows: relative (`90s`, `15m`, `1h30m`, `7d`, `now-90m`) or RFC 3339 bounds,
//! resolved once against the server's clock.
use thiserror::Error;

pub const ACCEPTED: &str = "a duration back from now (90s, 15m, 1h, 1h30m, 7d), now-<duration>, \
     now, or an RFC 3339 time (2026-11-25T10:00:00Z)";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WindowError {
    #[error("{field} {value:?} is not understood; use {ACCEPTED}")]
    Unparsable { field: &'static str, value: String },
    #[error("the window is empty or inverted: since resolves to {start} and until to {end}")]
    Inverted { start: String, end: String },
    #[error("{field} {value:?} reaches more than 400 days back; the collector keeps far less")]
    TooLong { field: &'static str, value: String },
}

const MAX_BACK_NS: i128 = 400 * 86_400 * 1_000_000_000;

/// A duration like `90s`, `15m`, `1h30m`, `7d`, `500ms` in nanoseconds.
pub fn parse_duration(s: &str) -> Option<i128> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total: i128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 12 {
            return None;
        }
        let n: i128 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let mult: i128 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            "w" => 7 * 86_400_000_000_000,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(mult)?)?;
    }
    Some(total)
}

/// RFC 3339 (`2026-11-25T10:00:00Z`, fractional seconds and numeric offsets allowed; a space
/// instead of `T` too) in Unix nanoseconds.
pub fn parse_rfc3339(s: &str) -> Option<i128> {
    let b = s.trim().as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || sec > 60
    {
        return None;
    }
    let mut i = 19;
    let mut frac_ns: i128 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = &b[start..i];
        if digits.is_empty() {
            return None;
        }
        for (k, c) in digits.iter().take(9).enumerate() {
            frac_ns += i128::from(c - b'0') * 10i128.pow(8 - k as u32);
        }
    }
    let offset_s: i64 = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    Some(i128::from(secs) * 1_000_000_000 + frac_ns)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Howard Hinnant's days_from_civil.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A resolved window `[start, end)` in Unix nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start_ns: i128,
    pub end_ns: i128,
    /// `since` was empty and `default_since` was used.
    pub defaulted: bool,
}

impl Window {
    pub fn start_ms(&self) -> i64 {
        (self.start_ns.div_euclid(1_000_000)) as i64
    }
    pub fn end_ms(&self) -> i64 {
        (self.end_ns.div_euclid(1_000_000)) as i64
    }
}

/// Checks one bound's form against the current clock (`since` reads a bare duration as "that
/// long ago"), so a client can refuse a bad flag before it calls anyone.
pub fn check_bound(field: &'static str, value: &str) -> Result<(), WindowError> {
    let now = crate::time::to_unix_nanos(&crate::time::now());
    bound(field, value, now, field == "since").map(|_| ())
}

fn bound(
    field: &'static str,
    value: &str,
    now_ns: i128,
    bare_is_back: bool,
) -> Result<i128, WindowError> {
    let bad = || WindowError::Unparsable {
        field,
        value: value.to_string(),
    };
    let v = value.trim();
    let back = if v == "now" {
        Some(0)
    } else if let Some(d) = v.strip_prefix("now-") {
        Some(parse_duration(d).ok_or_else(bad)?)
    } else if bare_is_back
        && v.bytes().next().is_some_and(|c| c.is_ascii_digit())
        && !v.contains(['-', ':'])
    {
        Some(parse_duration(v).ok_or_else(bad)?)
    } else {
        None
    };
    match back {
        Some(b) if b > MAX_BACK_NS => Err(WindowError::TooLong {
            field,
            value: value.to_string(),
        }),
        Some(b) => Ok(now_ns - b),
        None => parse_rfc3339(v).ok_or_else(bad),
    }
}

/// Resolves `since`/`until` against `now_ns`. An empty `since` means `default_since` back from
/// `until`'s resolution of now; an empty `until` means now.
pub fn resolve(
    since: &str,
    until: &str,
    now_ns: i128,
    default_since_ns: i128,
) -> Result<Window, WindowError> {
    let end = if until.trim().is_empty() {
        now_ns
    } else {
        bound("until", until, now_ns, false)?
    };
    let (start, defaulted) = if since.trim().is_empty() {
        (end - default_since_ns, true)
    } else {
        (bound("since", since, now_ns, true)?, false)
    };
    if start >= end {
        let r = |ns: i128| crate::time::rfc3339(&crate::time::from_unix_nanos(ns));
        return Err(WindowError::Inverted {
            start: r(start),
            end: r(end),
        });
    }
    Ok(Window {
        start_ns: start,
        end_ns: end,
        defaulted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i128 = 1_764_000_000_000_000_000;
    const S: i128 = 1_000_000_000;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(90 * S));
        assert_eq!(parse_duration("1h30m"), Some(5400 * S));
        assert_eq!(parse_duration("7d"), Some(7 * 86_400 * S));
        assert_eq!(parse_duration("500ms"), Some(S / 2));
        for bad in ["", "h", "10", "1y", "-5m", "1.5h", "99999999999999h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339_forms() {
        assert_eq!(parse_rfc3339("2025-11-24T16:00:00Z"), Some(NOW));
        assert_eq!(parse_rfc3339("2025-11-24T16:00:00.5Z"), Some(NOW + S / 2));
        assert_eq!(parse_rfc3339("2025-11-24 17:00:00+01:00"), Some(NOW));
        assert_eq!(parse_rfc3339("2025-11-24T15:30:00-00:30"), Some(NOW));
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400 * S));
        for bad in [
            "2025-02-29T00:00:00Z",
            "2025-11-24T16:00:00",
            "2025-13-01T00:00:00Z",
            "2025-11-24T16:00Z",
            "yesterday",
            "2025-11-24T16:00:00.Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn windows_resolve_and_errors_say_what_is_accepted() {
        let w = resolve("1h", "", NOW, 3600 * S).unwrap();
        assert_eq!(
            (w.start_ns, w.end_ns, w.defaulted),
            (NOW - 3600 * S, NOW, false)
        );
        let w = resolve("now-90m", "now-30m", NOW, 0).unwrap();
        assert_eq!((w.start_ns, w.end_ns), (NOW - 5400 * S, NOW - 1800 * S));
        let w = resolve("", "2025-11-24T15:00:00Z", NOW, 600 * S).unwrap();
        assert_eq!(
            (w.start_ns, w.end_ns, w.defaulted),
            (NOW - 4200 * S, NOW - 3600 * S, true)
        );
        let w = resolve("2025-11-24T15:00:00Z", "now", NOW, 0).unwrap();
        assert_eq!(w.start_ns, NOW - 3600 * S);
        let e = resolve("last hour", "", NOW, 0).unwrap_err();
        assert!(e.to_string().contains("RFC 3339"), "{e}");
        assert!(matches!(
            resolve("", "1h", NOW, S),
            Err(WindowError::Unparsable { field: "until", .. })
        ));
        assert!(matches!(
            resolve("now-1h", "now-2h", NOW, 0),
            Err(WindowError::Inverted { .. })
        ));
        assert!(matches!(
            resolve("500d", "", NOW, 0),
            Err(WindowError::TooLong { .. })
        ));
    }
}
