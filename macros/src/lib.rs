//! Attribute macros of [multiproc](https://docs.rs/multiproc). Use them through that crate:
//! `#[multiproc::task]` and `#[multiproc::main]`. This crate only parses, checks and emits code;
//! every piece of runtime logic lives in `multiproc-runtime`.

mod args;
mod ast;
mod expand;
#[cfg(test)]
mod fuzz;
mod spans;

use proc_macro::TokenStream;

/// Registers a free function as a task that worker processes can run. See `multiproc::task`.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::task(attr.into(), item.into()).into()
}

/// Marks `fn main` as the place where a re-executed child becomes a worker. See `multiproc::main`.
#[proc_macro_attribute]
pub fn main(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::main(attr.into(), item.into()).into()
}
