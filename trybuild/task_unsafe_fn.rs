#[multiproc::task]
unsafe fn first(bytes: Vec<u8>) -> u8 {
    unsafe { *bytes.get_unchecked(0) }
}

fn main() {}
