//! Encoding helpers over postcard (see `protocol` for why postcard).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Appends the postcard encoding of `value` to `out`.
#[inline]
pub(crate) fn encode_into<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> postcard::Result<()> {
    postcard::serialize_with_flavor(value, Append(out))
}

/// Decodes one value from the front of `input`, returning it and the rest.
#[inline]
pub(crate) fn decode_front<T: DeserializeOwned>(input: &[u8]) -> postcard::Result<(T, &[u8])> {
    postcard::take_from_bytes(input)
}

/// A postcard output that appends to a borrowed vector. The small slices postcard writes
/// (varints of one to ten bytes) are pushed byte by byte: a `memcpy` call per slice measured
/// as a large share of encoding small values.
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    #[inline]
    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.push(byte);
        Ok(())
    }

    #[inline]
    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        if bytes.len() <= 16 {
            for &byte in bytes {
                self.0.push(byte);
            }
        } else {
            self.0.extend_from_slice(bytes);
        }
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `map` sends each item as-is where the worker decodes a one-element tuple: postcard
    /// encodes a tuple as its fields in order, so the two are the same bytes.
    #[test]
    fn one_tuple_encodes_like_its_element() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        encode_into(&(String::from("x"), 5u64), &mut a).unwrap();
        encode_into(&((String::from("x"), 5u64),), &mut b).unwrap();
        assert_eq!(a, b);
        let (back, rest): ((String, u64), _) = decode_front(&a).unwrap();
        assert_eq!(back, ("x".to_string(), 5));
        assert!(rest.is_empty());
    }

    #[test]
    fn appends_without_clobbering() {
        let mut out = vec![1, 2, 3];
        encode_into(&"a longer string than sixteen bytes", &mut out).unwrap();
        assert_eq!(&out[..3], &[1, 2, 3]);
        let (back, _): (String, _) = decode_front(&out[3..]).unwrap();
        assert_eq!(back, "a longer string than sixteen bytes");
    }
}
