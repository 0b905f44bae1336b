//! The log sequence number: a byte position in the write-ahead log.
//!
//! Postgres writes an LSN as two hexadecimal halves, `16/B374D848`: the upper 32 bits, a slash,
//! and the lower 32 bits, uppercase and without zero padding. That form is what operators see in
//! `pg_replication_slots` and the logs, so `Display`, `Debug` and `FromStr` all use it. In JSON
//! (event envelopes, checkpoints) an LSN is a plain number so it sorts and compares as one.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A WAL position. Ordering is WAL order, so a commit LSN can serve as a version number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`, which Postgres uses for "no position" (InvalidXLogRecPtr).
    pub const ZERO: Lsn = Lsn(0);

    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl From<u64> for Lsn {
    fn from(value: u64) -> Self {
        Lsn(value)
    }
}

impl From<Lsn> for u64 {
    fn from(lsn: Lsn) -> Self {
        lsn.0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let upper = self.0 >> 32;
        let lower = self.0 & u64::from(u32::MAX);
        write!(f, "{upper:X}/{lower:X}")
    }
}

// Debug uses the Postgres form too: `Lsn(97328781384)` in a log line or a failed assertion
// would have to be converted by hand before it could be compared with what Postgres reports.
impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not an LSN in Postgres's `XXX/XXX` form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseLsnError {
    #[error(
        "invalid LSN {input:?}: expected two hexadecimal halves separated by '/', like 16/B374D848"
    )]
    MissingSlash { input: String },
    #[error("invalid LSN {input:?}: the {half} half must be 1 to 8 hexadecimal digits")]
    InvalidHalf { input: String, half: &'static str },
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    /// Accepts what Postgres's `pg_lsn` input accepts: 1 to 8 hex digits (either case) on each
    /// side of a single slash, nothing else (no sign, no whitespace, no `0x`).
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let (upper, lower) = input
            .split_once('/')
            .ok_or_else(|| ParseLsnError::MissingSlash {
                input: input.to_owned(),
            })?;
        let upper = parse_half(upper).ok_or_else(|| ParseLsnError::InvalidHalf {
            input: input.to_owned(),
            half: "upper",
        })?;
        let lower = parse_half(lower).ok_or_else(|| ParseLsnError::InvalidHalf {
            input: input.to_owned(),
            half: "lower",
        })?;
        Ok(Lsn((u64::from(upper) << 32) | u64::from(lower)))
    }
}

/// One half of an LSN. The explicit digit check matters: `u32::from_str_radix` alone would
/// also accept a leading `+`.
fn parse_half(half: &str) -> Option<u32> {
    let is_hex_digits =
        !half.is_empty() && half.len() <= 8 && half.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_hex_digits {
        return None;
    }
    u32::from_str_radix(half, 16).ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parse(text: &str) -> Result<Lsn, ParseLsnError> {
        text.parse()
    }

    #[test]
    fn displays_like_postgres() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0x1_0000_00AB).to_string(), "1/AB");
        assert_eq!(format!("{:?}", Lsn(0x16_B374_D848)), "16/B374D848");
    }

    #[test]
    fn zero_is_0_slash_0() {
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert_eq!(parse("0/0"), Ok(Lsn::ZERO));
        assert_eq!(Lsn::default(), Lsn::ZERO);
    }

    #[test]
    fn max_value_round_trips() {
        let max = Lsn(u64::MAX);
        assert_eq!(max.to_string(), "FFFFFFFF/FFFFFFFF");
        assert_eq!(parse("FFFFFFFF/FFFFFFFF"), Ok(max));
    }

    #[test]
    fn round_trips_through_text() {
        for value in [
            0,
            1,
            0xFFFF_FFFF,
            0x1_0000_0000,
            0x16_B374_D848,
            0xDEAD_BEEF_0000_0001,
            u64::MAX,
        ] {
            let lsn = Lsn::from(value);
            assert_eq!(parse(&lsn.to_string()), Ok(lsn), "round trip of {lsn}");
            assert_eq!(lsn.as_u64(), value);
            assert_eq!(u64::from(lsn), value);
        }
    }

    #[test]
    fn parses_lowercase_and_zero_padded_halves() {
        assert_eq!(parse("16/b374d848"), Ok(Lsn(0x16_B374_D848)));
        assert_eq!(parse("00000016/0000000A"), Ok(Lsn(0x16_0000_000A)));
    }

    #[test]
    fn orders_by_wal_position() {
        let earlier = parse("0/FFFFFFFF").unwrap();
        let later = parse("1/0").unwrap();
        assert!(earlier < later);
        assert!(Lsn::ZERO < earlier);
        let mut lsns = vec![Lsn(3), Lsn(1), Lsn(2)];
        lsns.sort();
        assert_eq!(lsns, [Lsn(1), Lsn(2), Lsn(3)]);
    }

    #[test]
    fn rejects_bad_inputs() {
        let missing_slash = ["", "16B374D848", "deadbeef"];
        for input in missing_slash {
            assert_eq!(
                parse(input),
                Err(ParseLsnError::MissingSlash {
                    input: input.to_owned()
                })
            );
        }
        let bad_upper = ["/0", "G/0", "+1/0", "-1/0", "123456789/0", " 1/0", "0x1/0"];
        for input in bad_upper {
            let error = parse(input).unwrap_err();
            assert_eq!(
                error,
                ParseLsnError::InvalidHalf {
                    input: input.to_owned(),
                    half: "upper"
                },
                "{input:?}"
            );
        }
        let bad_lower = ["0/", "0/G", "0/+1", "0/123456789", "0/1 ", "1/2/3"];
        for input in bad_lower {
            let error = parse(input).unwrap_err();
            assert_eq!(
                error,
                ParseLsnError::InvalidHalf {
                    input: input.to_owned(),
                    half: "lower"
                },
                "{input:?}"
            );
        }
    }

    #[test]
    fn error_message_names_the_input() {
        let message = parse("0/xyz").unwrap_err().to_string();
        assert!(message.contains("\"0/xyz\""), "{message}");
        assert!(message.contains("lower"), "{message}");
    }

    #[test]
    fn serializes_as_a_number() {
        let lsn = Lsn(0x16_B374_D848);
        assert_eq!(serde_json::to_string(&lsn).unwrap(), "97500059720");
        assert_eq!(serde_json::from_str::<Lsn>("97500059720").unwrap(), lsn);
        assert_eq!(
            serde_json::to_string(&Lsn(u64::MAX)).unwrap(),
            u64::MAX.to_string()
        );
    }

    proptest! {
        #[test]
        fn every_value_round_trips_through_text(value in any::<u64>()) {
            prop_assert_eq!(Lsn(value).to_string().parse::<Lsn>(), Ok(Lsn(value)));
        }
    }
}
