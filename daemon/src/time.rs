//! Times as people read them. The store and the protocol keep Unix seconds; messages and
//! tables show them as UTC dates.

/// Unix seconds as `2026-11-29 07:06:44` (UTC); out of jiff's range, the number itself.
pub fn format_utc(secs: i64) -> String {
    match jiff::Timestamp::from_second(secs) {
        Ok(t) => t.strftime("%Y-%m-%d %H:%M:%S").to_string(),
        Err(_) => secs.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::format_utc;

    #[test]
    fn dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(format_utc(1_709_251_199), "2024-02-29 23:59:59");
        assert_eq!(format_utc(-1), "1969-12-31 23:59:59");
        assert_eq!(format_utc(4_102_444_800), "2100-01-01 00:00:00");
        assert_eq!(format_utc(i64::MAX), i64::MAX.to_string());
    }
}
