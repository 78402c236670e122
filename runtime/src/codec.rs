//! Encoding helpers over postcard (see `protocol` for why postcard).

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::any::Any;

/// Where encoded bytes go: a `Vec<u8>`, or a worker's replies (`worker::Out`), which may be
/// built straight in shared memory.
pub(crate) trait Sink {
    fn push(&mut self, byte: u8);
    fn extend_from_slice(&mut self, bytes: &[u8]);
    fn len(&self) -> usize;
    fn truncate(&mut self, len: usize);
    /// The bytes written so far, to patch (a frame's length).
    fn as_mut_slice(&mut self) -> &mut [u8];
}

impl Sink for Vec<u8> {
    #[inline]
    fn push(&mut self, byte: u8) {
        Vec::push(self, byte);
    }

    #[inline]
    fn extend_from_slice(&mut self, bytes: &[u8]) {
        Vec::extend_from_slice(self, bytes);
    }

    #[inline]
    fn len(&self) -> usize {
        Vec::len(self)
    }

    #[inline]
    fn truncate(&mut self, len: usize) {
        Vec::truncate(self, len);
    }

    #[inline]
    fn as_mut_slice(&mut self) -> &mut [u8] {
        self
    }
}

/// Appends the postcard encoding of `value` to `out`.
#[inline]
pub(crate) fn encode_into<T: Serialize + ?Sized, S: Sink>(
    value: &T,
    out: &mut S,
) -> postcard::Result<()> {
    postcard::serialize_with_flavor(value, Append(out))
}

/// Decodes one value from the front of `input`, returning it and the rest.
#[inline]
pub(crate) fn decode_front<T: DeserializeOwned>(input: &[u8]) -> postcard::Result<(T, &[u8])> {
    postcard::take_from_bytes(input)
}

/// Appends the postcard encoding of a task's or a channel's value: as [`encode_into`], with a
/// `Vec<u8>` (or a one-element tuple of it: the arguments of `fn f(data: Vec<u8>)`) written as
/// one block.
///
/// serde's `Serialize` for `Vec<T>` hands the bytes of a `Vec<u8>` to the codec one at a time:
/// several times slower than a copy on large buffers (BENCHMARKS.md, W3). Postcard writes a
/// sequence of `u8` as its length (a varint) followed by the bytes, exactly as it writes a
/// byte string, so a `Vec<u8>` found at the top of a value is written as a byte string: the
/// same bytes, one copy. Inside other types, `serde_bytes` does the same (see `Payload`).
#[inline]
pub(crate) fn encode_value<T: Serialize + 'static, S: Sink>(
    value: &T,
    out: &mut S,
) -> postcard::Result<()> {
    match byte_vec(value) {
        Some(bytes) => encode_into(&AsBytes(bytes), out),
        None => encode_into(value, out),
    }
}

/// Decodes one value from the front of `input`, as [`decode_front`]: the reverse of
/// [`encode_value`], reading a top-level `Vec<u8>` (or one-element tuple of it) as one block.
#[inline]
pub(crate) fn decode_value<T: DeserializeOwned + 'static>(
    input: &[u8],
) -> postcard::Result<(T, &[u8])> {
    // Decoded into the caller's type through `Any`, when it is one of the two.
    let mut value: Option<T> = None;
    let slot = &mut value as &mut dyn Any;
    let rest = if let Some(slot) = slot.downcast_mut::<Option<Vec<u8>>>() {
        let (ByteVec(bytes), rest) = decode_front::<ByteVec>(input)?;
        *slot = Some(bytes);
        rest
    } else if let Some(slot) = slot.downcast_mut::<Option<(Vec<u8>,)>>() {
        let (ByteVec(bytes), rest) = decode_front::<ByteVec>(input)?;
        *slot = Some((bytes,));
        rest
    } else {
        return decode_front(input);
    };
    Ok((value.expect("set above"), rest))
}

/// The bytes of a `Vec<u8>` or of a `(Vec<u8>,)`, for [`encode_value`].
fn byte_vec<T: 'static>(value: &T) -> Option<&[u8]> {
    let value = value as &dyn Any;
    value
        .downcast_ref::<Vec<u8>>()
        .or_else(|| value.downcast_ref::<(Vec<u8>,)>().map(|(bytes,)| bytes))
        .map(Vec::as_slice)
}

/// Serializes a slice as a byte string.
struct AsBytes<'a>(&'a [u8]);

impl Serialize for AsBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

/// Deserializes a byte string into a `Vec<u8>`.
struct ByteVec(Vec<u8>);

impl<'de> serde::Deserialize<'de> for ByteVec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteVec;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<ByteVec, E> {
                Ok(ByteVec(bytes.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<ByteVec, E> {
                Ok(ByteVec(bytes))
            }
        }
        deserializer.deserialize_byte_buf(Visitor)
    }
}

/// A postcard output that appends to a borrowed vector. The small slices postcard writes
/// (varints of one to ten bytes) are pushed byte by byte: a `memcpy` call per slice measured
/// as a large share of encoding small values.
struct Append<'a, S: Sink>(&'a mut S);

impl<S: Sink> postcard::ser_flavors::Flavor for Append<'_, S> {
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

    /// A top-level `Vec<u8>` goes as a byte string, in the bytes serde's element-by-element
    /// encoding gives: either side can read what the other wrote.
    #[test]
    fn byte_vectors_are_one_block_in_the_same_bytes() {
        for len in [0usize, 1, 127, 128, 300, 70_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut fast = Vec::new();
            let mut slow = Vec::new();
            encode_value(&data, &mut fast).unwrap();
            encode_into(&data, &mut slow).unwrap();
            assert_eq!(fast, slow, "len {len}");
            let mut tuple = Vec::new();
            encode_value(&(data.clone(),), &mut tuple).unwrap();
            assert_eq!(tuple, slow, "len {len}, as a tuple");

            slow.push(9);
            let (back, rest): (Vec<u8>, _) = decode_value(&slow).unwrap();
            assert_eq!((back.as_slice(), rest), (data.as_slice(), &[9][..]));
            let ((back,), rest): ((Vec<u8>,), _) = decode_value(&slow).unwrap();
            assert_eq!((back.as_slice(), rest), (data.as_slice(), &[9][..]));
        }
        // Other types take the general path, and a truncated block is an error.
        let mut out = Vec::new();
        encode_value(&vec![1u16, 2], &mut out).unwrap();
        assert_eq!(decode_value::<Vec<u16>>(&out).unwrap().0, vec![1, 2]);
        let mut out = Vec::new();
        encode_value(&vec![5u8; 10], &mut out).unwrap();
        assert!(decode_value::<Vec<u8>>(&out[..5]).is_err());
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
