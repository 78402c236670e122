//! A typed view of the item under `#[task]` / `#[main]`, with every semantic check.
//!
//! Checks never stop at the first problem: each one adds to [`Errors`] so a user sees all of
//! them in one compile, each on the offending token with the fix spelled out.

use crate::args::Errors;
use proc_macro2::{Span, TokenStream};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::visit::Visit;
use syn::{FnArg, Item, ItemFn, ReturnType, Type};

/// A function accepted by `#[task]`.
pub struct TaskFn {
    pub item: ItemFn,
    /// Argument types, in order.
    pub arg_types: Vec<Type>,
}

/// Parses the input of `#[task]`. Returns the function even when it has problems, so the
/// caller can emit it next to the errors (no cascade of "cannot find function" at call sites).
pub fn parse_task(input: TokenStream, errors: &mut Errors) -> Result<TaskFn, TokenStream> {
    let item = match syn::parse2::<Item>(input.clone()) {
        Ok(Item::Fn(item)) => item,
        Ok(other) => {
            let what = describe(&other);
            errors.error(
                item_span(&other),
                format!(
                    "#[multiproc::task] applies to a free `fn`, not to {what}: put it on a function \
                     defined at module level"
                ),
            );
            return Err(input);
        }
        Err(err) => {
            errors.push(err);
            return Err(input);
        }
    };
    check_signature(&item, errors);
    check_task_attrs(&item, errors);
    // Argument errors are collected apart so that they follow the generic parameters' errors,
    // in source order, while the parameters' check can see which lifetimes the types use.
    let mut type_errors = Errors::default();
    let mut borrowed = Vec::new();
    let mut arg_types = Vec::new();
    for arg in &item.sig.inputs {
        match arg {
            FnArg::Receiver(receiver) => type_errors.error_spanned(
                receiver,
                "a task cannot take `self`: tasks are free functions run by name in another \
                 process; move it out of the `impl` block and pass the value as an argument",
            ),
            FnArg::Typed(pat_type) => {
                for attr in &pat_type.attrs {
                    if may_remove(attr) {
                        type_errors.error_spanned(
                            attr,
                            "a task's arguments cannot be `#[cfg]`-ed: the parent and the \
                             worker must agree on every argument; write one #[task] per \
                             configuration instead",
                        );
                    }
                }
                check_owned(&pat_type.ty, "argument", &mut borrowed, &mut type_errors);
                arg_types.push((*pat_type.ty).clone());
            }
        }
    }
    if let ReturnType::Type(_, ty) = &item.sig.output {
        if let Type::Never(never) = &**ty {
            type_errors.error_spanned(
                never,
                "a task cannot return `!`: the parent waits for a value it can receive; \
                 return `()` (a task that never returns can still loop forever)",
            );
        } else {
            check_owned(ty, "return type", &mut borrowed, &mut type_errors);
        }
    }
    check_generic_params(&item.sig.generics, &borrowed, errors);
    errors.append(type_errors);
    if let Some(clause) = &item.sig.generics.where_clause {
        errors.error_spanned(
            clause,
            "a task cannot have a `where` clause: its argument and return types must be \
             concrete; remove the clause",
        );
    }
    Ok(TaskFn { item, arg_types })
}

/// The names of Rust's primitive types: a task's name is a type too (an empty struct), which
/// would hide the primitive in its module.
const PRIMITIVES: [&str; 17] = [
    "bool", "char", "str", "i8", "i16", "i32", "i64", "i128", "isize", "u8", "u16", "u32", "u64",
    "u128", "usize", "f32", "f64",
];

/// Whether `attr` is `#[<name>]` or `#[multiproc::<name>]`.
fn is_ours(attr: &syn::Attribute, name: &str) -> bool {
    let segments: Vec<String> = attr
        .path()
        .segments
        .iter()
        .map(|segment| segment.ident.to_string())
        .collect();
    match segments.as_slice() {
        [only] => only == name,
        [.., krate, last] => krate == "multiproc" && last == name,
        [] => false,
    }
}

/// Attributes that cannot work on a task, and a name that would hide a primitive type.
fn check_task_attrs(item: &ItemFn, errors: &mut Errors) {
    for attr in &item.attrs {
        if is_ours(attr, "task") {
            errors.error_spanned(
                attr,
                "#[multiproc::task] is applied twice to this function: remove one",
            );
        } else if attr.path().is_ident("must_use") {
            errors.error_spanned(
                attr,
                "#[must_use] cannot work on a task: callers reach it through a function \
                 pointer, which carries no `must_use`; remove it (or return a `#[must_use]` type)",
            );
        }
    }
    let name = item.sig.ident.unraw().to_string();
    if PRIMITIVES.contains(&name.as_str()) {
        errors.error(
            item.sig.ident.span(),
            format!(
                "a task cannot be named `{name}`: #[multiproc::task] makes the name a type as \
                 well as a value, which would hide the primitive type `{name}` in this module; \
                 rename the function (or keep the name with `#[task(name = \"...\")]` on a \
                 function of another name)"
            ),
        );
    }
}

fn check_signature(item: &ItemFn, errors: &mut Errors) {
    let sig = &item.sig;
    if let Some(token) = &sig.asyncness {
        errors.error(
            token.span(),
            "a task cannot be `async`: each task runs on its own worker process; make it a \
             plain `fn` and, if it needs async I/O, build a runtime inside it (`block_on`)",
        );
    }
    if let Some(token) = &sig.constness {
        errors.error(
            token.span(),
            format!(
                "a task cannot be `const fn`: #[multiproc::task] makes `{}` a value that calls \
                 the function, and const contexts cannot call through it; remove `const`, or \
                 keep the `const fn` and call it from a separate #[task] function",
                sig.ident.unraw()
            ),
        );
    }
    if let Some(token) = &sig.unsafety {
        errors.error(
            token.span(),
            "a task cannot be `unsafe fn`: the pool calls it with whatever a caller sends and \
             cannot uphold its safety contract; make the function safe and use `unsafe` blocks \
             inside it",
        );
    }
    if let Some(abi) = &sig.abi {
        errors.error(
            abi.span(),
            "a task cannot declare an ABI: remove `extern`; the pool calls it as a Rust function",
        );
    }
    if let Some(variadic) = &sig.variadic {
        errors.error(variadic.span(), "a task cannot be variadic");
    }
}

/// Type and const parameters are reported where they are declared. A lifetime parameter is
/// reported only if no argument or return type uses it: where one does, the error on that argument (borrowed,
/// has a lifetime) already says what to change, and a second one on `<'a>` would be noise.
fn check_generic_params(generics: &syn::Generics, borrowed: &[syn::Lifetime], errors: &mut Errors) {
    let not_lifetimes: Vec<_> = generics
        .params
        .iter()
        .filter(|param| !matches!(param, syn::GenericParam::Lifetime(_)))
        .collect();
    if !not_lifetimes.is_empty() {
        errors.error_spanned(
            quote::quote!(#(#not_lifetimes)*),
            "a task cannot be generic: a worker finds it by name and needs one concrete \
             signature; write a #[task] for each concrete type (they can share a generic helper)",
        );
    }
    for param in generics.lifetimes() {
        if !borrowed.contains(&param.lifetime) {
            errors.error_spanned(
                param,
                "a task cannot have lifetime parameters: its arguments are sent to another \
                 process and must be owned; remove the parameter",
            );
        }
    }
}

/// Rejects types that cannot cross a process boundary by value: references, lifetimes other
/// than `'static`, `impl Trait`, `dyn Trait`, function pointers and `_`; each lifetime found is
/// pushed to `borrowed`. Serialize/Deserialize are left to the compiler (see `expand`).
fn check_owned(ty: &Type, role: &str, borrowed: &mut Vec<syn::Lifetime>, errors: &mut Errors) {
    struct Finder<'a> {
        role: &'a str,
        borrowed: &'a mut Vec<syn::Lifetime>,
        errors: &'a mut Errors,
    }
    // Each visit that reports does not descend: one error per offending type, not one per
    // token inside it.
    impl<'ast> Visit<'ast> for Finder<'_> {
        fn visit_type_reference(&mut self, node: &'ast syn::TypeReference) {
            self.borrowed.extend(node.lifetime.clone());
            let suggestion = owned_suggestion(&node.elem);
            self.errors.error_spanned(
                node,
                format!(
                    "task {} is borrowed: values are sent to another process and must be owned; \
                     use {suggestion}",
                    self.role
                ),
            );
        }
        fn visit_lifetime(&mut self, node: &'ast syn::Lifetime) {
            if node.ident == "static" {
                return;
            }
            self.borrowed.push(node.clone());
            self.errors.error_spanned(
                node,
                format!(
                    "task {} holds a borrow (`{node}`): values are sent to another process and \
                     must be owned; use an owned type such as `String` or `Vec<T>`, or `'static`",
                    self.role
                ),
            );
        }
        fn visit_type_path(&mut self, node: &'ast syn::TypePath) {
            // `Cow<str>`: a borrow with its lifetime left out, which would surface as the
            // compiler's "missing lifetime specifier" on the generated code.
            if elided_cow(node) {
                self.errors.error_spanned(
                    node,
                    format!(
                        "task {} holds a borrow (`Cow` with its lifetime left out): values are \
                         sent to another process and must be owned; use the owned type \
                         (`String` for `Cow<str>`), or `Cow<'static, _>`",
                        self.role
                    ),
                );
                return;
            }
            syn::visit::visit_type_path(self, node);
        }
        fn visit_type_impl_trait(&mut self, node: &'ast syn::TypeImplTrait) {
            self.errors.error_spanned(
                node,
                format!(
                    "task {} cannot be `impl Trait`: a worker needs one concrete type to \
                     deserialize; name the type (`Vec<u64>` rather than \
                     `impl IntoIterator<Item = u64>`)",
                    self.role
                ),
            );
        }
        fn visit_type_bare_fn(&mut self, node: &'ast syn::TypeBareFn) {
            self.errors.error_spanned(
                node,
                format!(
                    "task {} cannot be a function pointer: addresses do not carry over to \
                     another process; pass data, or another #[task] by name",
                    self.role
                ),
            );
        }
        fn visit_type_trait_object(&mut self, node: &'ast syn::TypeTraitObject) {
            self.errors.error_spanned(
                node,
                format!(
                    "task {} cannot be a trait object: a worker needs one concrete type to \
                     deserialize; use an enum or a concrete type",
                    self.role
                ),
            );
        }
        fn visit_type_infer(&mut self, node: &'ast syn::TypeInfer) {
            self.errors.error_spanned(
                node,
                format!(
                    "task {} must be written out: `_` is not allowed here",
                    self.role
                ),
            );
        }
    }
    Finder {
        role,
        borrowed,
        errors,
    }
    .visit_type(ty);
}

/// Whether `attr` may remove what it is on: `#[cfg]`, or a `#[cfg_attr]` that may apply one
/// (one that sets a lint, say, cannot).
fn may_remove(attr: &syn::Attribute) -> bool {
    if attr.path().is_ident("cfg") {
        return true;
    }
    if !attr.path().is_ident("cfg_attr") {
        return false;
    }
    let parsed = attr.parse_args_with(
        syn::punctuated::Punctuated::<syn::Meta, syn::Token![,]>::parse_terminated,
    );
    // Unparsable: left to the compiler, whose error says what is wrong with it.
    parsed.is_ok_and(|metas| {
        metas
            .iter()
            .skip(1)
            .any(|meta| meta.path().is_ident("cfg") || meta.path().is_ident("cfg_attr"))
    })
}

/// `Cow<...>` without a lifetime argument.
fn elided_cow(node: &syn::TypePath) -> bool {
    node.path.segments.last().is_some_and(|last| {
        last.ident == "Cow"
            && matches!(&last.arguments, syn::PathArguments::AngleBracketed(args)
                if !args
                    .args
                    .iter()
                    .any(|arg| matches!(arg, syn::GenericArgument::Lifetime(_))))
    })
}

fn owned_suggestion(elem: &Type) -> String {
    match elem {
        Type::Path(path) if path.path.is_ident("str") => "`String` instead of `&str`".into(),
        Type::Path(path) if path.path.is_ident("Path") => "`PathBuf` instead of `&Path`".into(),
        Type::Slice(slice) => {
            let inner = quote::ToTokens::to_token_stream(&slice.elem).to_string();
            format!("`Vec<{inner}>` instead of `&[{inner}]`")
        }
        other => {
            let inner = quote::ToTokens::to_token_stream(other).to_string();
            format!("`{inner}` by value instead of a reference")
        }
    }
}

/// Parses and checks the input of `#[main]`.
pub fn parse_main(input: TokenStream, errors: &mut Errors) -> Result<ItemFn, TokenStream> {
    let item = match syn::parse2::<Item>(input.clone()) {
        Ok(Item::Fn(item)) => item,
        Ok(other) => {
            errors.error(
                item_span(&other),
                format!(
                    "#[multiproc::main] applies to `fn main`, not to {}",
                    describe(&other)
                ),
            );
            return Err(input);
        }
        Err(err) => {
            errors.push(err);
            return Err(input);
        }
    };
    for attr in &item.attrs {
        if is_ours(attr, "main") {
            errors.error_spanned(
                attr,
                "#[multiproc::main] is applied twice to this function: remove one",
            );
        }
    }
    let sig = &item.sig;
    if sig.ident != "main" {
        errors.error(
            sig.ident.span(),
            format!(
                "#[multiproc::main] goes on `fn main`, the entry a re-executed worker passes \
                 through, not on `{}`; for tests, give the test target `harness = false` and \
                 a `#[multiproc::main] fn main`",
                sig.ident
            ),
        );
    }
    if let Some(token) = &sig.asyncness {
        errors.error(
            token.span(),
            "#[multiproc::main] needs a synchronous `fn main`: put it below your async \
             runtime's attribute, as in `#[tokio::main] #[multiproc::main] async fn main()` (the \
             runtime's attribute expands first and hands it a synchronous `main`), or start the \
             runtime yourself inside a plain `fn main`",
        );
    }
    if !sig.inputs.is_empty() {
        errors.error(sig.inputs.span(), "`fn main` takes no arguments");
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.error(sig.generics.span(), "`fn main` cannot be generic");
    }
    Ok(item)
}

fn describe(item: &Item) -> &'static str {
    match item {
        Item::Struct(_) => "a struct",
        Item::Enum(_) => "an enum",
        Item::Impl(_) => "an `impl` block",
        Item::Trait(_) => "a trait",
        Item::Mod(_) => "a module",
        Item::Const(_) => "a const",
        Item::Static(_) => "a static",
        Item::Type(_) => "a type alias",
        Item::Use(_) => "a `use` declaration",
        Item::Union(_) => "a union",
        Item::Macro(_) => "a macro invocation",
        _ => "this item",
    }
}

fn item_span(item: &Item) -> Span {
    // Point at the keyword and name rather than the whole body.
    match item {
        Item::Struct(item) => item.ident.span(),
        Item::Enum(item) => item.ident.span(),
        Item::Impl(item) => item.impl_token.span(),
        Item::Trait(item) => item.ident.span(),
        Item::Mod(item) => item.ident.span(),
        Item::Const(item) => item.ident.span(),
        Item::Static(item) => item.ident.span(),
        Item::Type(item) => item.ident.span(),
        Item::Union(item) => item.ident.span(),
        other => other.span(),
    }
}
