//! `Instant`: a FHIR `instant` (FHIR R4 §2.24.0.1 "instant": `YYYY-MM-DDThh:mm:ss[.f{1,9}]` with
//! `Z` or a `±hh:mm` offset up to 14:00), held in UTC and checked to lie in the years 0001–9999
//! once converted, so that formatting it can never fail.
//!
//! Every instant the proxy reads from a client (`_since`, `_until`) or writes (`transactionTime`,
//! the searches' `_lastUpdated` bounds) goes through this type. The shape is checked here rather
//! than by `time`'s RFC 3339 parser, which accepts any separator byte, any number of fraction
//! digits and offsets up to ±23:59: a value that is not a FHIR instant must be refused up front, not
//! turned into an instant that cannot be written back (`9999-12-31T23:59:59-23:59` is year 10000 in
//! UTC).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

/// A FHIR instant in UTC, within 0001-01-01T00:00:00Z ..= 9999-12-31T23:59:59.999999999Z.
///
/// Displays (and serializes) as the FHIR instant string in UTC (`Z`), with the fraction of a
/// second only when it is not zero and without trailing zeros, e.g. `2024-01-02T02:04:05.123Z`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(OffsetDateTime);

/// Why a text is not an [`Instant`]; each reads as the end of a sentence about the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InstantError {
    #[error(
        "is not a FHIR instant (YYYY-MM-DDThh:mm:ss[.fff] and Z or ±hh:mm, e.g. 2024-01-31T12:00:00Z or 2024-01-31T12:00:00+01:00)"
    )]
    Syntax,
    #[error("is not a date and time of the calendar")]
    NoSuchDate,
    #[error("has a UTC offset beyond ±14:00")]
    Offset,
    #[error("is outside the years 0001–9999 once converted to UTC")]
    OutOfRange,
}

impl Instant {
    /// The current time.
    pub fn now() -> Self {
        // The system clock is within 0001–9999; if it ever is not, the nearest bound is the
        // honest answer rather than a panic.
        let now = OffsetDateTime::now_utc();
        Self::try_from(now).unwrap_or(if now.year() < 1 { Self::MIN } else { Self::MAX })
    }

    /// This instant without its fraction of a second (never later than it).
    pub fn whole_seconds(self) -> Self {
        Self(self.0.replace_nanosecond(0).unwrap_or(self.0))
    }

    /// 0001-01-01T00:00:00Z.
    pub const MIN: Self = Self(time::macros::datetime!(0001-01-01 00:00:00 UTC));
    /// 9999-12-31T23:59:59.999999999Z.
    pub const MAX: Self = Self(time::macros::datetime!(9999-12-31 23:59:59.999_999_999 UTC));

    /// Parses a FHIR instant. A leap second (`:60`) is read as the last nanosecond of the second
    /// before it, as `time` does, so the order of instants is kept.
    pub fn parse(text: &str) -> Result<Self, InstantError> {
        let b = text.as_bytes();
        let num = |at: usize, len: usize| -> Result<u32, InstantError> {
            let digits = b.get(at..at + len).ok_or(InstantError::Syntax)?;
            digits.iter().try_fold(0u32, |n, d| {
                if d.is_ascii_digit() {
                    Ok(n * 10 + u32::from(d - b'0'))
                } else {
                    Err(InstantError::Syntax)
                }
            })
        };
        let lit = |at: usize, c: u8| {
            if b.get(at) == Some(&c) {
                Ok(())
            } else {
                Err(InstantError::Syntax)
            }
        };
        let year = num(0, 4)?;
        lit(4, b'-')?;
        let month = num(5, 2)?;
        lit(7, b'-')?;
        let day = num(8, 2)?;
        lit(10, b'T')?;
        let hour = num(11, 2)?;
        lit(13, b':')?;
        let minute = num(14, 2)?;
        lit(16, b':')?;
        let second = num(17, 2)?;
        let mut at = 19;
        let mut nanos = 0;
        if b.get(at) == Some(&b'.') {
            let digits = b[at + 1..]
                .iter()
                .take_while(|d| d.is_ascii_digit())
                .count();
            if !(1..=9).contains(&digits) {
                return Err(InstantError::Syntax);
            }
            nanos = num(at + 1, digits)? * 10u32.pow(9 - digits as u32);
            at += 1 + digits;
        }
        let offset_seconds = match &b[at..] {
            b"Z" => 0,
            [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
                let (hours, minutes) = (num(at + 1, 2)?, num(at + 4, 2)?);
                if minutes > 59 {
                    return Err(InstantError::Syntax);
                }
                if hours * 60 + minutes > 14 * 60 {
                    return Err(InstantError::Offset);
                }
                let seconds = (hours * 3600 + minutes * 60) as i32;
                if *sign == b'-' { -seconds } else { seconds }
            }
            _ => return Err(InstantError::Syntax),
        };

        let (second, nanos) = if second == 60 {
            (59, 999_999_999)
        } else {
            (second, nanos)
        };
        let month = u8::try_from(month)
            .ok()
            .and_then(|m| Month::try_from(m).ok())
            .ok_or(InstantError::NoSuchDate)?;
        let date = Date::from_calendar_date(year as i32, month, day as u8)
            .map_err(|_| InstantError::NoSuchDate)?;
        let time = Time::from_hms_nano(hour as u8, minute as u8, second as u8, nanos)
            .map_err(|_| InstantError::NoSuchDate)?;
        let offset =
            UtcOffset::from_whole_seconds(offset_seconds).map_err(|_| InstantError::Offset)?;
        Self::try_from(PrimitiveDateTime::new(date, time).assume_offset(offset))
    }

    /// The instant as a `time` value (in UTC).
    pub fn as_offset_date_time(self) -> OffsetDateTime {
        self.0
    }
}

impl TryFrom<OffsetDateTime> for Instant {
    type Error = InstantError;

    /// Converts to UTC; refused when that leaves the years 0001–9999.
    fn try_from(value: OffsetDateTime) -> Result<Self, InstantError> {
        value
            .checked_to_offset(UtcOffset::UTC)
            .filter(|utc| (1..=9999).contains(&utc.year()))
            .map(Self)
            .ok_or(InstantError::OutOfRange)
    }
}

impl From<Instant> for OffsetDateTime {
    fn from(instant: Instant) -> Self {
        instant.0
    }
}

impl std::str::FromStr for Instant {
    type Err = InstantError;

    fn from_str(text: &str) -> Result<Self, InstantError> {
        Self::parse(text)
    }
}

impl fmt::Display for Instant {
    /// Written by hand: every field is in range by construction, so nothing here can fail (the
    /// `time` RFC 3339 formatter is fallible, and its error used to become an empty string).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0;
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )?;
        let nanos = t.nanosecond();
        if nanos != 0 {
            let fraction = format!("{nanos:09}");
            write!(f, ".{}", fraction.trim_end_matches('0'))?;
        }
        f.write_str("Z")
    }
}

impl Serialize for Instant {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Instant {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Self::parse(&text).map_err(|e| serde::de::Error::custom(format!("{text:?} {e}")))
    }
}

/// Generators for property tests of code that reads instants.
#[cfg(test)]
pub(crate) mod strategies {
    use proptest::prelude::*;

    /// Strings shaped like instants: every field drawn a little past its valid range, and half
    /// of them at the edges of the years 0001–9999 with any offset (where converting to UTC leaves
    /// the range: the panic of issue 14).
    pub(crate) fn instant_like() -> impl Strategy<Value = String> {
        let zone = prop_oneof![
            Just("Z".to_owned()),
            (prop::bool::ANY, 0u32..=24, 0u32..=60).prop_map(|(minus, h, m)| format!(
                "{}{h:02}:{m:02}",
                if minus { '-' } else { '+' }
            )),
        ];
        let fraction = prop::option::of("[0-9]{0,11}")
            .prop_map(|f| f.map(|f| format!(".{f}")).unwrap_or_default());
        let anywhere = (
            0u32..=9999,
            0u32..=14,
            0u32..=33,
            0u32..=25,
            0u32..=61,
            0u32..=61,
        )
            .prop_map(|(y, mo, d, h, mi, s)| {
                format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}")
            });
        let edge = prop_oneof![
            Just("0000-01-01T00:00:00"),
            Just("0000-12-31T23:59:59"),
            Just("0001-01-01T00:00:00"),
            Just("0001-01-01T13:59:59"),
            Just("9999-12-31T23:59:59"),
            Just("9999-12-31T10:00:00"),
        ]
        .prop_map(str::to_owned);
        (prop_oneof![anywhere, edge], fraction, zone)
            .prop_map(|(date_time, fraction, zone)| format!("{date_time}{fraction}{zone}"))
    }
}

#[cfg(test)]
mod tests {
    use super::strategies::instant_like;
    use super::*;
    use proptest::prelude::*;

    fn parse(text: &str) -> Result<String, InstantError> {
        Instant::parse(text).map(|i| i.to_string())
    }

    #[test]
    fn whole_seconds_drop_the_fraction_only() {
        let whole = |t: &str| Instant::parse(t).unwrap().whole_seconds().to_string();
        assert_eq!(
            whole("2024-01-02T03:04:05.999999999Z"),
            "2024-01-02T03:04:05Z"
        );
        assert_eq!(whole("2024-01-02T03:04:05Z"), "2024-01-02T03:04:05Z");
        assert_eq!(whole("0001-01-01T00:00:00.5Z"), "0001-01-01T00:00:00Z");
    }

    #[test]
    fn offsets_are_converted_to_utc_and_trailing_zeros_dropped() {
        assert_eq!(
            parse("2024-01-02T03:04:05.123+01:00").unwrap(),
            "2024-01-02T02:04:05.123Z"
        );
        assert_eq!(
            parse("2024-01-02T03:04:05.000-00:30").unwrap(),
            "2024-01-02T03:34:05Z"
        );
        assert_eq!(
            parse("2024-12-31T23:00:00.000000001-14:00").unwrap(),
            "2025-01-01T13:00:00.000000001Z"
        );
    }

    #[test]
    fn the_bounds_are_years_0001_to_9999_in_utc() {
        assert_eq!(
            parse("0001-01-01T00:00:00Z").unwrap(),
            "0001-01-01T00:00:00Z"
        );
        assert_eq!(
            parse("9999-12-31T23:59:59.999999999Z").unwrap(),
            "9999-12-31T23:59:59.999999999Z"
        );
        assert_eq!(Instant::MIN.to_string(), "0001-01-01T00:00:00Z");
        assert_eq!(Instant::MAX.to_string(), "9999-12-31T23:59:59.999999999Z");
        // The inputs of issue 14: year 10000 and year 0 once in UTC.
        assert_eq!(
            parse("9999-12-31T23:59:59-01:00"),
            Err(InstantError::OutOfRange)
        );
        assert_eq!(
            parse("0001-01-01T00:00:00+00:01"),
            Err(InstantError::OutOfRange)
        );
        assert_eq!(parse("0000-06-01T00:00:00Z"), Err(InstantError::OutOfRange));
        assert_eq!(
            parse("9999-12-31T23:59:59-23:59"),
            Err(InstantError::Offset)
        );
        assert_eq!(
            parse("0000-01-01T00:00:00+23:59"),
            Err(InstantError::Offset)
        );
        // ±14:00 is the largest offset FHIR allows.
        assert!(parse("2024-01-01T00:00:00+14:00").is_ok());
        assert_eq!(
            parse("2024-01-01T00:00:00+14:01"),
            Err(InstantError::Offset)
        );
    }

    #[test]
    fn only_the_fhir_shape_is_accepted() {
        for bad in [
            "",
            "2024-01-02",
            "2024-01-02T03:04Z",
            "2024-01-02T03:04:05",
            "2024-01-02 03:04:05Z",
            "2024-01-02t03:04:05Z",
            "2024-01-02T03:04:05z",
            "2024-01-02X03:04:05Z",
            "2024-01-02T03:04:05.Z",
            "2024-01-02T03:04:05.1234567890Z",
            "2024-01-02T03:04:05+0100",
            "2024-01-02T03:04:05+01:60",
            "2024-01-02T03:04:05Z ",
            " 2024-01-02T03:04:05Z",
            "+2024-01-02T03:04:05Z",
            "2024-1-02T03:04:05Z",
            "２０２４-01-02T03:04:05Z",
            "2024-01-02T03:04:05Zé",
        ] {
            assert_eq!(parse(bad), Err(InstantError::Syntax), "{bad:?}");
        }
        for impossible in [
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-00-01T00:00:00Z",
            "2024-01-32T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T23:60:00Z",
            "0000-60-01T30:70:80+05:00",
        ] {
            assert_eq!(
                parse(impossible),
                Err(InstantError::NoSuchDate),
                "{impossible:?}"
            );
        }
        assert_eq!(
            parse("2024-02-29T23:59:59.5Z").unwrap(),
            "2024-02-29T23:59:59.5Z"
        );
    }

    #[test]
    fn a_leap_second_sorts_just_before_the_next_second() {
        let leap = Instant::parse("2016-12-31T23:59:60Z").unwrap();
        assert_eq!(leap.to_string(), "2016-12-31T23:59:59.999999999Z");
        assert!(leap > Instant::parse("2016-12-31T23:59:59.9Z").unwrap());
        assert!(leap < Instant::parse("2017-01-01T00:00:00Z").unwrap());
    }

    #[test]
    fn serde_uses_the_instant_string() {
        let i = Instant::parse("2024-01-02T03:04:05+01:00").unwrap();
        let json = serde_json::to_string(&i).unwrap();
        assert_eq!(json, "\"2024-01-02T02:04:05Z\"");
        assert_eq!(serde_json::from_str::<Instant>(&json).unwrap(), i);
        let err = serde_json::from_str::<Instant>("\"9999-12-31T23:59:59-01:00\"").unwrap_err();
        assert!(err.to_string().contains("0001–9999"), "{err}");
        assert!(serde_json::from_str::<Instant>("17").is_err());
    }

    fn any_instant() -> impl Strategy<Value = Instant> {
        let (min, max) = (
            Instant::MIN.0.unix_timestamp_nanos(),
            Instant::MAX.0.unix_timestamp_nanos(),
        );
        (min..=max).prop_map(|nanos| {
            Instant::try_from(OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap()).unwrap()
        })
    }

    proptest! {
        #[test]
        fn formatting_round_trips(instant in any_instant()) {
            let text = instant.to_string();
            prop_assert_eq!(Instant::parse(&text), Ok(instant));
            // And agrees with the RFC 3339 formatter wherever that one succeeds.
            let rfc = instant.0.format(&time::format_description::well_known::Rfc3339).unwrap();
            prop_assert_eq!(rfc, text);
        }

        #[test]
        fn whatever_is_accepted_is_in_range_and_writes_back(text in instant_like()) {
            if let Ok(instant) = Instant::parse(&text) {
                prop_assert!((Instant::MIN..=Instant::MAX).contains(&instant));
                prop_assert_eq!(instant.0.offset(), UtcOffset::UTC);
                let written = instant.to_string();
                prop_assert_eq!(Instant::parse(&written), Ok(instant));
                // The same moment as `time` reads it, wherever `time` can (it rejects `:60`).
                if let Ok(t) = OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339) {
                    prop_assert_eq!(t, instant.0);
                }
            }
        }

        #[test]
        fn never_panics_on_any_string(text in "\\PC{0,40}") {
            let _ = Instant::parse(&text);
        }

        #[test]
        fn never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..40)) {
            let _ = Instant::parse(&String::from_utf8_lossy(&bytes));
        }
    }
}
