//! The attributes never panic: a panic reaches the user as "custom attribute panicked", with no
//! location. This feeds `expand::task` and `expand::main` a few thousand inputs, mutated from
//! realistic seeds token by token, and checks that every expansion either is a well-formed
//! list of items or carries a `compile_error!`.
//!
//! `proc_macro2` works outside a proc-macro context, so this is an ordinary unit test. The
//! generator is a fixed-seed xorshift: a failure names its input and replays.

use crate::expand;
use proc_macro2::{Delimiter, Group, TokenStream, TokenTree};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Items as users write them, right and wrong; each is mutated many times.
const ITEMS: &[&str] = &[
    "fn square(x: u64) -> u64 { x * x }",
    "pub fn eight(a: u8, b: u16, c: u32, d: u64, e: i8, f: i16, g: i32, h: i64) -> i128 { 0 }",
    "fn unit() {}",
    "/// Docs.\n#[inline] #[cfg(test)] pub(crate) fn r#type(Point { x, y }: Point, (a, _): (u8, u8), mut m: u8, _: ()) -> Result<u64, String> { Ok(0) }",
    "fn largest<T: PartialOrd>(items: Vec<T>) -> Option<T> where T: Copy { None }",
    "async unsafe extern \"C\" fn fetch(url: &str, bytes: &'a [u8], f: fn(u8), d: Box<dyn Send + 'a>, i: impl Into<u64>, _: _) -> &'static str { \"\" }",
    "const fn double<'a, const N: usize>(self, x: Cow<'a, str>) -> [u8; N] { [0; N] }",
    "fn main() {}",
    "async fn main() -> Result<(), Error> { Ok(()) }",
    "fn main(argc: i32) where u8: Copy {}",
    "struct Job { id: u64 }",
    "impl Job { fn run(&self) {} }",
    "enum E { A } trait T {} mod m {} type A = u8; use a::b; static S: u8 = 0; const C: u8 = 0;",
    "macro_rules! m { () => {} }",
    "fn variadic(x: u8, ...) {}",
];

/// Attribute arguments, right and wrong.
const ATTRS: &[&str] = &[
    "",
    "name = \"jobs::square\"",
    "crate = ::my_facade::multiproc",
    "name = \"a\", crate = crate::facade::multiproc",
    "name = \"\"",
    "nmae = \"x\"",
    "name = \"a\", name = \"b\"",
    "name = jobs::square",
    "crate = \"multiproc\"",
    "crate = 1",
    "name",
    "crate =",
    "name = \"a\" crate = x",
    "(name = \"a\")",
    "a::b = c",
];

/// Tokens spliced in: the ones the checks look for, and ones that break syntax.
const SPLICES: &[&str] = &[
    "async",
    "const",
    "unsafe",
    "extern",
    "\"C\"",
    "pub",
    "fn",
    "struct",
    "impl",
    "dyn",
    "where",
    "self",
    "Self",
    "mut",
    "&",
    "'a",
    "'static",
    "<",
    ">",
    "::",
    ":",
    ",",
    ";",
    "->",
    "=",
    "_",
    "...",
    "#",
    "!",
    "?",
    "u64",
    "String",
    "main",
    "square",
    "\"s\"",
    "42",
    "r#type",
    "(u8, u16)",
    "[u8; 4]",
    "{ 1 }",
    "<T>",
    "T: Copy",
    "#[doc = \"d\"]",
    "name = \"n\"",
    "crate = x",
];

#[test]
fn attributes_never_panic() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut expansions = 0;
    for round in 0..250 {
        for (which, seed) in ITEMS.iter().enumerate() {
            let item = if round == 0 {
                parse(seed)
            } else {
                mutate(parse(seed), &mut rng, 0)
            };
            let attr = match round % 4 {
                0 => mutate(parse(ATTRS[(round + which) % ATTRS.len()]), &mut rng, 0),
                1 => parse(ATTRS[(round + which) % ATTRS.len()]),
                _ => TokenStream::new(),
            };
            for (macro_name, expand) in [("task", expand::task as Expand), ("main", expand::main)] {
                check(macro_name, expand, &attr, &item);
                expansions += 1;
            }
        }
    }
    assert!(expansions > 1000, "only {expansions} expansions ran");
}

/// Valid tasks of every supported shape, generated: these take the code-generating path, whose
/// output must parse as items.
#[test]
fn generated_tasks_expand_to_items() {
    const TYPES: &[&str] = &[
        "u64",
        "String",
        "Vec<u8>",
        "Option<(u8, bool)>",
        "Result<u64, String>",
        "Point",
        "Rc<Vec<u64>>",
        "[u8; 4]",
        "()",
        "Box<str>",
        "Cow<'static, str>",
        "my::Path<u8>",
        "::std::collections::BTreeMap<String, Vec<f64>>",
        "(u8,)",
        "<u8 as Tr>::Out",
    ];
    const PATTERNS: &[&str] = &["x", "mut x", "_", "(a, b)", "Point { x, y }", "r#ref"];
    const ATTRS: &[&str] = &["", "name = \"jobs::t\"", "crate = ::facade::multiproc"];
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
    for i in 0..400 {
        let args: Vec<String> = (0..rng.below(10))
            .map(|n| {
                let pattern = PATTERNS[rng.below(PATTERNS.len())].replace('x', &format!("x{n}"));
                format!("{pattern}: {}", TYPES[rng.below(TYPES.len())])
            })
            .collect();
        let output = match rng.below(3) {
            0 => String::new(),
            _ => format!("-> {}", TYPES[rng.below(TYPES.len())]),
        };
        let vis = ["", "pub", "pub(crate)", "pub(super)"][rng.below(4)];
        let attrs = [
            "",
            "#[doc = \"Docs.\"]",
            "#[cfg(all())]",
            "#[inline] #[deprecated = \"Use another.\"]",
        ][rng.below(4)];
        let name = ["t", "r#type", "square", "é"][rng.below(4)];
        let item = format!(
            "{attrs} {vis} fn {name}{i}({}) {output} {{ todo!() }}",
            args.join(", ")
        );
        let attr = parse(ATTRS[rng.below(ATTRS.len())]);
        let expanded = expand::task(attr, parse(&item));
        let text = expanded.to_string();
        assert!(
            !text.contains("compile_error"),
            "a valid task was rejected: {item}\n{text}"
        );
        syn::parse2::<syn::File>(expanded).unwrap_or_else(|err| panic!("{err}: {item}\n{text}"));
    }
}

type Expand = fn(TokenStream, TokenStream) -> TokenStream;

fn check(macro_name: &str, expand: Expand, attr: &TokenStream, item: &TokenStream) {
    let output = catch_unwind(AssertUnwindSafe(|| expand(attr.clone(), item.clone())))
        .unwrap_or_else(|_| panic!("#[{macro_name}({attr})] panicked on: {item}"));
    let well_formed = syn::parse2::<syn::File>(output.clone()).is_ok();
    let reports = output.to_string().contains("compile_error");
    assert!(
        well_formed || reports,
        "#[{macro_name}({attr})] emitted malformed code without an error for: {item}\n\
         output: {output}"
    );
}

fn parse(source: &str) -> TokenStream {
    source.parse().expect("seeds are valid token streams")
}

/// One to three edits (delete, duplicate, swap, splice, truncate, or recurse into a group).
fn mutate(tokens: TokenStream, rng: &mut XorShift, depth: usize) -> TokenStream {
    let mut trees: Vec<TokenTree> = tokens.into_iter().collect();
    for _ in 0..=rng.below(3) {
        let at = rng.below(trees.len() + 1);
        match rng.below(6) {
            0 if at < trees.len() => {
                trees.remove(at);
            }
            1 if at < trees.len() => trees.insert(at, trees[at].clone()),
            2 if trees.len() > 1 => {
                let other = rng.below(trees.len());
                let at = at.min(trees.len() - 1);
                trees.swap(at, other);
            }
            3 => trees.truncate(at),
            4 if depth < 3 => {
                let groups: Vec<usize> = (0..trees.len())
                    .filter(|&i| matches!(trees[i], TokenTree::Group(_)))
                    .collect();
                if let Some(&i) = groups.get(rng.below(groups.len().max(1)))
                    && let TokenTree::Group(group) = &trees[i]
                {
                    let inner = mutate(group.stream(), rng, depth + 1);
                    trees[i] = TokenTree::Group(Group::new(group.delimiter(), inner));
                }
            }
            _ => {
                let splice = parse(SPLICES[rng.below(SPLICES.len())]);
                let splice = if rng.below(8) == 0 {
                    vec![TokenTree::Group(Group::new(Delimiter::None, splice))]
                } else {
                    splice.into_iter().collect()
                };
                trees.splice(at..at, splice);
            }
        }
    }
    trees.into_iter().collect()
}

struct XorShift(u64);

impl XorShift {
    /// A number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if n == 0 {
            0
        } else {
            (self.0 % n as u64) as usize
        }
    }
}
