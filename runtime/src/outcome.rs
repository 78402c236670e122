//! One item's outcome on the wire: a tag byte, then the task's value (tag 0), a panic report
//! (tag 1: message, location, backtrace) or a failure message (tag 2).
//!
//! The tag is exactly what postcard would write for a three-variant enum's index; writing and
//! reading it by hand keeps the per-item cost at a byte, where serde's derived enum machinery
//! measured several times the cost of decoding the value itself (see BENCHMARKS.md).

use crate::codec::{self, Sink};
use crate::error::{Error, ErrorKind};
use serde::Serialize;
use serde::de::DeserializeOwned;

const OK: u8 = 0;
const PANICKED: u8 = 1;
const FAILED: u8 = 2;

/// One item's outcome, as the parent reads it.
pub(crate) enum Outcome<T> {
    Ok(T),
    Panicked {
        message: String,
        location: Option<String>,
        backtrace: Option<String>,
    },
    Failed {
        message: String,
    },
}

impl<T> Outcome<T> {
    /// The task's value, or its panic or failure as an error (the caller adds which task and
    /// item it concerns).
    pub(crate) fn into_result(self) -> Result<T, Error> {
        match self {
            Outcome::Ok(value) => Ok(value),
            Outcome::Panicked {
                message,
                location,
                backtrace,
            } => Err(Error::new(ErrorKind::Panicked, message)
                .with_location(location)
                .with_backtrace(backtrace)),
            Outcome::Failed { message } => Err(Error::new(ErrorKind::Codec, message)),
        }
    }
}

/// Appends a successful outcome. On error, `out` may hold a partial encoding: truncate it.
#[inline]
pub(crate) fn encode_ok<T: Serialize + 'static, S: Sink>(
    value: &T,
    out: &mut S,
) -> postcard::Result<()> {
    out.push(OK);
    codec::encode_value(value, out)
}

pub(crate) fn encode_panicked<S: Sink>(
    message: &str,
    location: Option<&str>,
    backtrace: Option<&str>,
    out: &mut S,
) {
    out.push(PANICKED);
    codec::encode_into(&(message, location, backtrace), out).expect("strings always encode");
}

pub(crate) fn encode_failed<S: Sink>(message: &str, out: &mut S) {
    out.push(FAILED);
    codec::encode_into(message, out).expect("strings always encode");
}

/// Decodes one outcome from the front of `input`.
#[inline]
pub(crate) fn decode<T: DeserializeOwned + 'static>(
    input: &[u8],
) -> postcard::Result<(Outcome<T>, &[u8])> {
    let (&tag, rest) = input
        .split_first()
        .ok_or(postcard::Error::DeserializeUnexpectedEnd)?;
    match tag {
        OK => codec::decode_value::<T>(rest).map(|(value, rest)| (Outcome::Ok(value), rest)),
        PANICKED => {
            let ((message, location, backtrace), rest) =
                codec::decode_front::<(String, Option<String>, Option<String>)>(rest)?;
            Ok((
                Outcome::Panicked {
                    message,
                    location,
                    backtrace,
                },
                rest,
            ))
        }
        FAILED => {
            let (message, rest) = codec::decode_front::<String>(rest)?;
            Ok((Outcome::Failed { message }, rest))
        }
        _ => Err(postcard::Error::DeserializeBadEnum),
    }
}

/// The message and location of a failed outcome, read without knowing the task's output
/// type (for the initializer, whose value is ignored): `None` for a success.
pub(crate) fn failure_of(encoded: &[u8]) -> Option<(String, Option<String>)> {
    match encoded.first() {
        Some(&OK) => None,
        _ => match decode::<()>(encoded) {
            Ok((
                Outcome::Panicked {
                    message, location, ..
                },
                _,
            )) => Some((message, location)),
            Ok((Outcome::Failed { message }, _)) => Some((message, None)),
            Ok((Outcome::Ok(()), _)) => None,
            Err(_) => Some(("an undecodable outcome".to_owned(), None)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip() {
        let mut buf = Vec::new();
        encode_ok(&(7u64, "x".to_string()), &mut buf).unwrap();
        encode_panicked("boom", Some("a.rs:1:2"), None, &mut buf);
        encode_failed("bad", &mut buf);
        let (first, rest) = decode::<(u64, String)>(&buf).unwrap();
        assert!(matches!(first, Outcome::Ok((7, ref s)) if s == "x"));
        let (second, rest) = decode::<(u64, String)>(rest).unwrap();
        assert!(matches!(second, Outcome::Panicked { ref message, .. } if message == "boom"));
        let (third, rest) = decode::<(u64, String)>(rest).unwrap();
        assert!(matches!(third, Outcome::Failed { ref message } if message == "bad"));
        assert!(rest.is_empty());
        assert!(decode::<u64>(&[9, 1]).is_err());
        assert!(decode::<u64>(&[]).is_err());
    }

    /// The hand-written tag is the byte postcard writes for an enum's variant index.
    #[test]
    fn tags_match_postcard_enum_encoding() {
        #[derive(Serialize)]
        enum Shape<'a> {
            Ok(u64),
            Panicked(&'a str, Option<&'a str>, Option<&'a str>),
            Failed(&'a str),
        }
        let mut ours = Vec::new();
        encode_ok(&5u64, &mut ours).unwrap();
        encode_panicked("p", None, Some("b"), &mut ours);
        encode_failed("f", &mut ours);
        let mut theirs = Vec::new();
        for shape in [
            Shape::Ok(5),
            Shape::Panicked("p", None, Some("b")),
            Shape::Failed("f"),
        ] {
            codec::encode_into(&shape, &mut theirs).unwrap();
        }
        assert_eq!(ours, theirs);
    }

    #[test]
    fn failure_of_reads_any_output_type() {
        let mut buf = Vec::new();
        encode_panicked("init failed", Some("init.rs:3:1"), None, &mut buf);
        assert_eq!(
            failure_of(&buf),
            Some(("init failed".into(), Some("init.rs:3:1".into())))
        );
        let mut ok = Vec::new();
        encode_ok(&vec![1u8, 2, 3], &mut ok).unwrap();
        assert_eq!(failure_of(&ok), None);
    }
}
