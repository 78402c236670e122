//! Encoding helpers over postcard (see `protocol` for why postcard).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Appends the postcard encoding of `value` to `out`.
pub(crate) fn encode_into<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> postcard::Result<()> {
    postcard::to_extend(value, Append(out)).map(|_| ())
}

/// Decodes one value from the front of `input`, returning it and the rest.
pub(crate) fn decode_front<T: DeserializeOwned>(input: &[u8]) -> postcard::Result<(T, &[u8])> {
    postcard::take_from_bytes(input)
}

/// `Extend<u8>` over a borrowed vector, so postcard writes straight into a frame buffer.
struct Append<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Append<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        self.0.extend(iter);
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
}
