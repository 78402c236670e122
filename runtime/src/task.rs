//! The traits `#[multiproc::task]` implements, and the bound on values that cross processes.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A value that can be sent to or returned from a worker process: anything `Serialize +
/// DeserializeOwned + Send + 'static`. Implemented automatically; derive serde's traits for
/// your own types.
///
/// Binary data: a `Vec<u8>` that is a whole argument, result or channel message is carried as
/// one block. Inside other types (a struct field, a tuple of several arguments, a
/// `Vec<Vec<u8>>`) serde encodes it element by element, three to four times slower on
/// 8 MiB payloads (BENCHMARKS.md, W3): use `serde_bytes::ByteBuf` there, or
/// `#[serde(with = "serde_bytes")]` on the field, which are written and read as one block.
///
/// # Examples
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Point { x: f64, y: f64 }
///
/// fn assert_payload<T: multiproc::Payload>() {}
/// assert_payload::<Point>();
/// assert_payload::<(String, Vec<u8>, Option<i64>)>();
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be sent between processes",
    label = "task arguments and results must implement `serde::Serialize` and `serde::Deserialize`",
    note = "derive them: `#[derive(serde::Serialize, serde::Deserialize)]`, or use an owned type that has them (`String`, `Vec<T>`, ...)"
)]
pub trait Payload: Serialize + DeserializeOwned + Send + 'static {}

// `do_not_recommend`: a missing `Serialize` or `Deserialize` is then reported once, as "`T`
// cannot be sent between processes" (the message above), rather than once per serde trait.
#[diagnostic::do_not_recommend]
impl<T: Serialize + DeserializeOwned + Send + 'static> Payload for T {}

/// A function registered with `#[multiproc::task]`: a name a worker process can look up, the
/// tuple of its arguments, and its output.
///
/// You do not implement this trait: the attribute does. Its path (`square`) is then a value
/// that [`Pool::map`](crate::Pool::map) and friends accept, and it still calls the function
/// directly (`square(3)`).
///
/// # Examples
///
/// ```
/// #[multiproc::task]
/// fn pow(x: u64, y: u32) -> u64 { x.pow(y) }
///
/// use multiproc::Task;
/// assert_eq!(<pow as Task>::call((2, 10)), 1024);
/// assert!(<pow as Task>::NAME.ends_with("::pow"));
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a multiproc task",
    label = "expected a function marked `#[multiproc::task]`",
    note = "mark a named `fn` with `#[multiproc::task]` so that worker processes can find it by name; closures cannot be sent to another process"
)]
pub trait Task: Copy + Send + Sync + 'static {
    /// The arguments, as a tuple: `(u64, u32)` for `fn pow(x: u64, y: u32)`, `()` for none.
    type Args: Payload;
    /// The return type; `()` for a function that returns nothing.
    type Output: Payload;
    /// The registered name: `module_path!()::fn_name`, or the `name = "..."` given.
    ///
    /// ```
    /// use multiproc::{Task, task};
    ///
    /// #[task(name = "geometry::area")]
    /// fn area(w: f64, h: f64) -> f64 { w * h }
    ///
    /// assert_eq!(area::NAME, "geometry::area");
    /// ```
    const NAME: &'static str;
    /// Runs the function in this process, with its arguments as one tuple.
    ///
    /// ```
    /// use multiproc::{Task, task};
    ///
    /// #[task]
    /// fn greet(name: String) -> String { format!("hello, {name}") }
    ///
    /// assert_eq!(greet::call(("ada".to_owned(),)), "hello, ada");
    /// ```
    fn call(args: Self::Args) -> Self::Output;
}

/// A task of exactly one argument: what [`Pool::map`](crate::Pool::map) and
/// [`Pool::imap`](crate::Pool::imap) take, each item being that argument.
///
/// # Examples
///
/// ```
/// #[multiproc::task]
/// fn square(x: u64) -> u64 { x * x }
///
/// fn takes_unary<T: multiproc::UnaryTask<Arg = u64>>(_: T) {}
/// takes_unary(square);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a `#[multiproc::task]` of one argument",
    label = "`map` and `imap` call the task with each item as its only argument",
    note = "for a task of several arguments, call `starmap` with one tuple of arguments per call; for a task of none, `apply(task, ())`",
    note = "for a plain function or a closure, mark a named `fn` with `#[multiproc::task]`; closures cannot be sent to another process"
)]
pub trait UnaryTask: Task {
    /// The single argument's type.
    type Arg: Payload;
}
