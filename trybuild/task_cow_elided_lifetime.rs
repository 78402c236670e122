use std::borrow::Cow;

#[multiproc::task]
fn shout(text: Cow<str>) -> String {
    text.to_uppercase()
}

fn main() {}
