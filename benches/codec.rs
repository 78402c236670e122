//! Divan benchmarks of the codec (postcard, as the runtime drives it: `to_extend` into a
//! frame buffer, `take_from_bytes` out of it) on the payloads of the pool benchmarks:
//! a million `u64` (W1's items), and 8 MiB as `Vec<u8>` and as `serde_bytes::ByteBuf` (W3),
//! next to a plain copy of the same bytes.
//!
//! `cargo bench --bench codec`. See BENCHMARKS.md for what the numbers say about W3.

use divan::Bencher;
use divan::counter::{BytesCount, ItemsCount};
use serde_bytes::ByteBuf;

const ITEMS: u64 = 1_000_000;
const LEN: usize = 8 << 20;

fn main() {
    divan::main();
}

/// The runtime's way of encoding: postcard writes through `Extend<u8>` into a borrowed `Vec`.
struct Append<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Append<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

fn encode<T: serde::Serialize>(value: &T, out: &mut Vec<u8>) {
    postcard::to_extend(value, Append(out)).expect("encodes");
}

fn bytes() -> Vec<u8> {
    (0..LEN).map(|i| i as u8).collect()
}

#[divan::bench]
fn u64_encode(bencher: Bencher) {
    let mut out = Vec::with_capacity(ITEMS as usize * 4);
    bencher.counter(ItemsCount::new(ITEMS)).bench_local(|| {
        out.clear();
        for x in 0..ITEMS {
            encode(&(x * x), &mut out);
        }
        out.len()
    });
}

#[divan::bench]
fn u64_decode(bencher: Bencher) {
    let mut frame = Vec::new();
    for x in 0..ITEMS {
        encode(&(x * x), &mut frame);
    }
    bencher.counter(ItemsCount::new(ITEMS)).bench_local(|| {
        let mut rest = frame.as_slice();
        let mut sum = 0u64;
        while !rest.is_empty() {
            let (x, tail) = postcard::take_from_bytes::<u64>(rest).expect("decodes");
            sum = sum.wrapping_add(x);
            rest = tail;
        }
        sum
    });
}

/// Encodes `data` (8 MiB of some byte container) into a reused buffer.
fn bench_encode<T: serde::Serialize>(bencher: Bencher, data: &T) {
    let mut out = Vec::with_capacity(LEN + 16);
    bencher.counter(BytesCount::new(LEN)).bench_local(|| {
        out.clear();
        encode(data, &mut out);
        out.len()
    });
}

/// Decodes `data`'s encoding as a `T`.
fn bench_decode<T: serde::Serialize + serde::de::DeserializeOwned>(bencher: Bencher, data: &T) {
    let mut frame = Vec::new();
    encode(data, &mut frame);
    bencher
        .counter(BytesCount::new(LEN))
        .bench_local(|| postcard::take_from_bytes::<T>(&frame).expect("decodes").0);
}

#[divan::bench]
fn vec_u8_encode(bencher: Bencher) {
    bench_encode(bencher, &bytes());
}

#[divan::bench]
fn vec_u8_decode(bencher: Bencher) {
    bench_decode(bencher, &bytes());
}

#[divan::bench]
fn byte_buf_encode(bencher: Bencher) {
    bench_encode(bencher, &ByteBuf::from(bytes()));
}

#[divan::bench]
fn byte_buf_decode(bencher: Bencher) {
    bench_decode(bencher, &ByteBuf::from(bytes()));
}

/// The floor: copying the bytes into a fresh vector.
#[divan::bench]
fn copy(bencher: Bencher) {
    let data = bytes();
    bencher
        .counter(BytesCount::new(LEN))
        .bench_local(|| data.clone());
}
