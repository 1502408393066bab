//! Sizes and durations as the configuration file spells them.
//!
//! This module owns the unit grammar of the config, and nothing else:
//!
//! - A **size** is a non-negative whole number, optionally followed by a
//!   binary unit: `4096`, `64KiB`, `1G`, `512MiB`. `K`, `KB` and `KiB` all
//!   mean 1024 (likewise `M`, `G`, `T`, `P`, `E`), `B` means bytes, units are
//!   case-insensitive and may be separated from the number by spaces. A bare
//!   TOML integer is a number of bytes.
//! - A **duration** is a non-negative whole number followed by `ms`, `s`, `m`
//!   or `h` (case-insensitive): `500ms`, `10s`, `2m`, `1h`. A number without a
//!   unit, as a string or a bare TOML integer, means seconds.
//!
//! Fractions (`1.5G`, `0.5s`) are refused: write `1536MiB` or `500ms`.
//! [`deserialize_size`] and [`deserialize_duration`] plug the same grammar
//! into serde through `#[serde(deserialize_with = "...")]`.

use std::fmt;
use std::time::Duration;

use serde::Deserializer;
use serde::de::{self, Visitor};

/// A size or duration the config cannot accept. The message quotes the input
/// and shows the accepted spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Not a size at all.
    #[error("{0:?} is not a size (use e.g. 4096, 64KiB, 1G)")]
    NotASize(String),
    /// A well-formed size that does not fit in 64 bits.
    #[error("{0:?} is too large a size (at most 16EiB - 1 bytes)")]
    SizeTooLarge(String),
    /// Not a duration at all.
    #[error("{0:?} is not a duration (use e.g. 500ms, 10s, 2m)")]
    NotADuration(String),
    /// A well-formed duration too long to represent.
    #[error("{0:?} is too long a duration")]
    DurationTooLong(String),
}

const KIB: u64 = 1 << 10;

/// Binary units from largest to smallest, with the spelling `format_size`
/// writes.
const SIZE_UNITS: [(u64, &str); 6] = [
    (KIB << 50, "EiB"),
    (KIB << 40, "PiB"),
    (KIB << 30, "TiB"),
    (KIB << 20, "GiB"),
    (KIB << 10, "MiB"),
    (KIB, "KiB"),
];

/// Splits `"64 KiB"` into `("64", "KiB")`. The number part holds ASCII digits
/// only and may be empty; the unit has surrounding spaces removed.
fn split_number(input: &str) -> (&str, &str) {
    let trimmed = input.trim();
    let end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    (&trimmed[..end], trimmed[end..].trim_start())
}

/// Parses a size (see the module documentation) into bytes.
pub fn parse_size(input: &str) -> Result<u64, UnitError> {
    let not_a_size = || UnitError::NotASize(input.to_owned());
    let (digits, unit) = split_number(input);
    if digits.is_empty() {
        return Err(not_a_size());
    }
    let multiplier = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => KIB << 10,
        "g" | "gb" | "gib" => KIB << 20,
        "t" | "tb" | "tib" => KIB << 30,
        "p" | "pb" | "pib" => KIB << 40,
        "e" | "eb" | "eib" => KIB << 50,
        _ => return Err(not_a_size()),
    };
    let too_large = || UnitError::SizeTooLarge(input.to_owned());
    let number: u64 = digits.parse().map_err(|_| too_large())?;
    number.checked_mul(multiplier).ok_or_else(too_large)
}

/// Writes a size in the largest binary unit that represents it exactly:
/// `65536` → `64KiB`, `1000` → `1000`. [`parse_size`] reads it back unchanged.
pub fn format_size(bytes: u64) -> String {
    if bytes != 0 {
        for (unit, name) in SIZE_UNITS {
            if bytes.is_multiple_of(unit) {
                return format!("{}{name}", bytes / unit);
            }
        }
    }
    bytes.to_string()
}

/// Parses a duration (see the module documentation).
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    let not_a_duration = || UnitError::NotADuration(input.to_owned());
    let too_long = || UnitError::DurationTooLong(input.to_owned());
    let (digits, unit) = split_number(input);
    if digits.is_empty() {
        return Err(not_a_duration());
    }
    let seconds_per_unit = match unit.to_ascii_lowercase().as_str() {
        "ms" => {
            let millis: u64 = digits.parse().map_err(|_| too_long())?;
            return Ok(Duration::from_millis(millis));
        }
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(not_a_duration()),
    };
    let number: u64 = digits.parse().map_err(|_| too_long())?;
    let seconds = number.checked_mul(seconds_per_unit).ok_or_else(too_long)?;
    Ok(Duration::from_secs(seconds))
}

/// Writes a duration in the largest unit that represents it exactly:
/// `90s` → `90s`, `120s` → `2m`, `1500ms` → `1500ms`, zero → `0s`.
/// The config has no unit finer than a millisecond, so any sub-millisecond
/// part is dropped; everything [`parse_duration`] returns reads back
/// unchanged.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 {
        return "0s".to_owned();
    }
    for (unit, name) in [(3_600_000, "h"), (60_000, "m"), (1000, "s")] {
        if millis.is_multiple_of(unit) {
            return format!("{}{name}", millis / unit);
        }
    }
    format!("{millis}ms")
}

/// serde `deserialize_with` helper for a size given as a string or a bare
/// integer (bytes).
pub fn deserialize_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(SizeVisitor)
}

/// serde `deserialize_with` helper for a duration given as a string or a bare
/// integer (seconds).
pub fn deserialize_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    deserializer.deserialize_any(DurationVisitor)
}

struct SizeVisitor;

impl Visitor<'_> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size such as 4096, 64KiB or 1G")
    }

    fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<u64, E> {
        Ok(bytes)
    }

    fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<u64, E> {
        u64::try_from(bytes).map_err(|_| E::custom(UnitError::NotASize(bytes.to_string())))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<u64, E> {
        parse_size(text).map_err(E::custom)
    }
}

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as 500ms, 10s or 2m")
    }

    fn visit_u64<E: de::Error>(self, seconds: u64) -> Result<Duration, E> {
        Ok(Duration::from_secs(seconds))
    }

    fn visit_i64<E: de::Error>(self, seconds: i64) -> Result<Duration, E> {
        u64::try_from(seconds)
            .map(Duration::from_secs)
            .map_err(|_| E::custom(UnitError::NotADuration(seconds.to_string())))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
        parse_duration(text).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Deserialize;

    #[test]
    fn every_size_spelling() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("4096", 4096),
            ("12B", 12),
            ("12b", 12),
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("64KB", 64 << 10),
            ("64kb", 64 << 10),
            ("64KiB", 64 << 10),
            ("64kib", 64 << 10),
            ("64KIB", 64 << 10),
            ("512M", 512 << 20),
            ("512MB", 512 << 20),
            ("512MiB", 512 << 20),
            ("1G", 1 << 30),
            ("1GB", 1 << 30),
            ("1GiB", 1 << 30),
            ("1g", 1 << 30),
            ("2T", 2 << 40),
            ("2TB", 2 << 40),
            ("2TiB", 2 << 40),
            ("3P", 3 << 50),
            ("3PiB", 3 << 50),
            ("15E", 15 << 60),
            ("15EiB", 15 << 60),
            ("  64 KiB  ", 64 << 10),
            ("007", 7),
            ("18446744073709551615", u64::MAX),
        ];
        for &(text, bytes) in cases {
            assert_eq!(parse_size(text), Ok(bytes), "{text:?}");
        }
    }

    #[test]
    fn bad_sizes() {
        for text in [
            "", " ", "K", "KiB", "12XB", "1.5G", "-1", "+1", "1 2", "1KiBB", "1iB", "0x10", "1e3",
            "١٢", "1 G B",
        ] {
            assert_eq!(
                parse_size(text),
                Err(UnitError::NotASize(text.to_owned())),
                "{text:?}"
            );
        }
        for text in ["16E", "18446744073709551616", "99999999999999999999999G"] {
            assert_eq!(
                parse_size(text),
                Err(UnitError::SizeTooLarge(text.to_owned())),
                "{text:?}"
            );
        }
        assert_eq!(
            parse_size("12XB").unwrap_err().to_string(),
            r#""12XB" is not a size (use e.g. 4096, 64KiB, 1G)"#
        );
    }

    #[test]
    fn size_formatting() {
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(1024), "1KiB");
        assert_eq!(format_size(64 << 10), "64KiB");
        assert_eq!(format_size(1536 << 20), "1536MiB");
        assert_eq!(format_size(1 << 30), "1GiB");
        assert_eq!(format_size(15 << 60), "15EiB");
        assert_eq!(format_size(u64::MAX), u64::MAX.to_string());
    }

    #[test]
    fn every_duration_spelling() {
        let cases: &[(&str, Duration)] = &[
            ("0", Duration::ZERO),
            ("10", Duration::from_secs(10)),
            ("500ms", Duration::from_millis(500)),
            ("500MS", Duration::from_millis(500)),
            ("10s", Duration::from_secs(10)),
            ("10S", Duration::from_secs(10)),
            ("2m", Duration::from_secs(120)),
            ("2M", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("1H", Duration::from_secs(3600)),
            (" 3 s ", Duration::from_secs(3)),
            ("0ms", Duration::ZERO),
        ];
        for &(text, duration) in cases {
            assert_eq!(parse_duration(text), Ok(duration), "{text:?}");
        }
    }

    #[test]
    fn bad_durations() {
        for text in [
            "", "s", "ms", "1.5s", "-1s", "10x", "10 sec", "1d", "1us", "10ss", "1 0s", "+1s",
        ] {
            assert_eq!(
                parse_duration(text),
                Err(UnitError::NotADuration(text.to_owned())),
                "{text:?}"
            );
        }
        for text in ["99999999999999999999s", "18446744073709551615h"] {
            assert_eq!(
                parse_duration(text),
                Err(UnitError::DurationTooLong(text.to_owned())),
                "{text:?}"
            );
        }
        assert_eq!(
            parse_duration("10x").unwrap_err().to_string(),
            r#""10x" is not a duration (use e.g. 500ms, 10s, 2m)"#
        );
    }

    #[test]
    fn duration_formatting() {
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(10)), "10s");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_micros(1500)), "1ms");
    }

    #[derive(Debug, Deserialize)]
    struct Units {
        #[serde(deserialize_with = "deserialize_size")]
        size: u64,
        #[serde(deserialize_with = "deserialize_duration")]
        duration: Duration,
    }

    #[test]
    fn deserializers_take_strings_and_integers() {
        let units: Units = toml::from_str("size = \"64KiB\"\nduration = \"500ms\"").unwrap();
        assert_eq!(units.size, 64 << 10);
        assert_eq!(units.duration, Duration::from_millis(500));

        let units: Units = toml::from_str("size = 4096\nduration = 3").unwrap();
        assert_eq!(units.size, 4096);
        assert_eq!(units.duration, Duration::from_secs(3));
    }

    #[test]
    fn deserializers_refuse_other_values() {
        let message = |text: &str| {
            toml::from_str::<Units>(text)
                .unwrap_err()
                .message()
                .to_owned()
        };
        assert_eq!(
            message("size = -1\nduration = 1"),
            r#""-1" is not a size (use e.g. 4096, 64KiB, 1G)"#
        );
        assert_eq!(
            message("size = 1\nduration = -1"),
            r#""-1" is not a duration (use e.g. 500ms, 10s, 2m)"#
        );
        assert!(message("size = 1.5\nduration = 1").contains("a size such as 4096, 64KiB or 1G"));
        assert!(message("size = 1\nduration = true").contains("a duration such as 500ms"));
        assert_eq!(
            message("size = \"1X\"\nduration = 1"),
            r#""1X" is not a size (use e.g. 4096, 64KiB, 1G)"#
        );
    }

    proptest! {
        #[test]
        fn size_round_trips(bytes: u64) {
            prop_assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
        }

        #[test]
        fn duration_round_trips(millis in 0u64..(u64::MAX / 1000)) {
            let duration = Duration::from_millis(millis);
            prop_assert_eq!(parse_duration(&format_duration(duration)), Ok(duration));
        }

        #[test]
        fn parsers_never_panic(text in any::<String>()) {
            let _ = parse_size(&text);
            let _ = parse_duration(&text);
        }

        #[test]
        fn parsers_never_panic_on_near_misses(text in "[ 0-9]{0,25}[ a-zA-Z.+-]{0,5}") {
            let _ = parse_size(&text);
            let _ = parse_duration(&text);
        }
    }
}
