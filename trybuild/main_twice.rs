// Twice would start two fork servers.
#[multiproc::main]
#[multiproc::main]
fn main() {}
