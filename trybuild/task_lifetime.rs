use std::borrow::Cow;

#[multiproc::task]
fn shout<'a>(text: Cow<'a, str>) -> String {
    text.to_uppercase()
}

fn main() {}
