//! Code generation. Every path goes through `#krate::__private`, so users never depend on
//! inventory or serde themselves (typetag's `__private` pattern).
//!
//! For `#[task] fn square(x: u64) -> u64 { .. }` this emits, in the user's module:
//! - `struct square;` (a unit value with the function's name and docs) that derefs to
//!   `fn(u64) -> u64`, so `square(3)` still calls the function directly and `square` is a
//!   value `pool.map` accepts;
//! - the function itself, private and renamed `__multiproc_task_square`;
//! - `impl Task for square` (name, argument tuple, output) and, for one argument, `UnaryTask`;
//! - a registry entry submitted with `inventory`, found by name in a worker process.
//!
//! Both impls hold only `where for<'__multiproc> u64: Payload`, one bound per argument and
//! return type. When a type is not a payload, the impls themselves are then free of errors (an
//! impl whose associated types break `Task`'s bounds is reported once for the argument tuple
//! and once more for `UnaryTask::Arg`, each in serde's words), and the one error left is where
//! `Task` is first required: the registry entry, spanned at the user's type (see `spans`). A
//! call site of the task reports the same missing trait. The `for<'__multiproc>` keeps the
//! bound from being a "trivial bound", which the compiler would reject outright.

use crate::args::{Errors, MainArgs, TaskArgs};
use crate::ast;
use crate::spans;
use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::ext::IdentExt;
use syn::{Attribute, ReturnType, Type};

pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let args = TaskArgs::parse(attr, &mut errors);
    let parsed = ast::parse_task(item, &mut errors);
    match (parsed, errors.into_compile_errors()) {
        (Ok(task), None) => emit_task(&args, &task),
        // On error, emit the user's item unchanged next to the errors, so that its call sites
        // do not fill the output with secondary "cannot find" errors (tokio-macros does this).
        (Ok(task), Some(compile_errors)) => {
            let item = task.item;
            quote!(#item #compile_errors)
        }
        (Err(item), compile_errors) => quote!(#item #compile_errors),
    }
}

fn emit_task(args: &TaskArgs, task: &ast::TaskFn) -> TokenStream {
    let krate = krate(args.krate.as_ref());
    let private = quote!(#krate::__private);
    let mut item = task.item.clone();
    let ident = item.sig.ident.clone();
    let vis = item.vis.clone();
    let hidden = format_ident!("__multiproc_task_{}", ident.unraw());
    item.sig.ident = hidden.clone();
    // Private: only the generated items call it, and a `pub` copy would have rustc warn about
    // `__multiproc_task_square`, a name the user never wrote.
    item.vis = syn::Visibility::Inherited;

    let (docs, cfgs, fn_attrs) = split_attrs(std::mem::take(&mut item.attrs));
    item.attrs = cfgs.iter().cloned().chain(fn_attrs).collect();

    let arg_types = &task.arg_types;
    let output = match &item.sig.output {
        ReturnType::Default => quote!(()),
        ReturnType::Type(_, ty) => quote!(#ty),
    };
    let payload_types: Vec<&Type> = arg_types
        .iter()
        .chain(match &item.sig.output {
            ReturnType::Default => None,
            ReturnType::Type(_, ty) => Some(&**ty),
        })
        .collect();
    // A private type in these public impls is reported once per item that names it; giving
    // `Args`, `Arg` and deref's `Target` one span makes the compiler print it once: at the
    // argument's type for one argument, else at the parameter list.
    let signature = if let [only] = arg_types.as_slice() {
        spans::range(only)
    } else {
        let params = item.sig.paren_token.span;
        (params.open(), params.close())
    };
    let target = spans::item_over(
        quote!(type Target =),
        &quote!(fn(#(#arg_types),*) -> #output),
        quote!(;),
        signature,
    );
    // The struct spans the function's name: "the trait `UnaryTask` is not implemented for
    // `pow`" then shows `fn pow`.
    let struct_token = spans::respan(quote!(struct), ident.span());
    let fields = spans::respan(quote!({}), ident.span());
    let const_token = spans::respan(quote!(const), ident.span());
    let deprecated: Vec<&Attribute> = docs
        .iter()
        .filter(|attr| attr.path().is_ident("deprecated"))
        .collect();
    let impls = task_impls(args, task, &krate, &hidden, signature)
        .into_iter()
        .map(|tokens| quote!(#(#cfgs)* #[allow(deprecated)] #tokens));
    let registered = spans::registered(&ident, &payload_types);

    quote! {
        #(#cfgs)*
        #(#docs)*
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        #vis #struct_token #ident #fields

        // The value `square` is a constant, not a unit struct: a call `square(x);` of a task
        // returning `()` is then not taken for a struct literal with no effect
        // (`clippy::no_effect`).
        #(#cfgs)*
        #(#deprecated)*
        #[doc(hidden)]
        #[allow(non_upper_case_globals, deprecated)]
        #vis #const_token #ident: #ident = #ident {};

        #[doc(hidden)]
        // A task's arguments arrive by value from another process: owned is the point.
        #[allow(clippy::needless_pass_by_value)]
        #item

        #(#cfgs)*
        // A `#[deprecated]` task warns where it is used, not here.
        #[allow(deprecated)]
        impl ::core::ops::Deref for #ident {
            #target
            fn deref(&self) -> &Self::Target {
                const FUNCTION: fn(#(#arg_types),*) -> #output = #hidden;
                &FUNCTION
            }
        }

        #(#impls)*

        #(#cfgs)*
        #[allow(deprecated)]
        const _: () = {
            #private::inventory::submit! {
                #private::TaskEntry::new::<#registered>(::core::file!(), ::core::line!())
            }
        };
    }
}

/// `impl Task` and, for a task of one argument, `impl UnaryTask`, both `where` every argument
/// and return type is a `Payload` (see the module docs).
fn task_impls(
    args: &TaskArgs,
    task: &ast::TaskFn,
    krate: &TokenStream,
    hidden: &syn::Ident,
    signature: (proc_macro2::Span, proc_macro2::Span),
) -> Vec<TokenStream> {
    let private = quote!(#krate::__private);
    let ident = &task.item.sig.ident;
    let arg_types = &task.arg_types;
    let output_type = match &task.item.sig.output {
        ReturnType::Default => None,
        ReturnType::Type(_, ty) => Some(&**ty),
    };
    let output = output_type.map_or_else(|| quote!(()), |ty| quote!(#ty));
    let bounds = arg_types
        .iter()
        .chain(output_type)
        .map(|ty| spans::payload_bound(ty, krate));
    let where_clause = quote!(where #(#bounds),*);
    let name = if let Some(lit) = &args.name {
        quote!(#lit)
    } else {
        let unraw = ident.unraw().to_string();
        quote!(::core::concat!(::core::module_path!(), "::", #unraw))
    };
    let vars: Vec<_> = (0..arg_types.len())
        .map(|i| format_ident!("__arg{i}"))
        .collect();
    let args_item = spans::item_over(
        quote!(type Args =),
        &quote!((#(#arg_types,)*)),
        quote!(;),
        signature,
    );
    let mut impls = vec![spans::trait_impl(
        quote!(impl #private::Task for #ident),
        &where_clause,
        quote! {
            #args_item
            type Output = #output;
            const NAME: &'static str = #name;
            #[inline]
            fn call(args: Self::Args) -> Self::Output {
                let (#(#vars,)*) = args;
                #hidden(#(#vars),*)
            }
        },
        ident.span(),
    )];
    if let [ty] = arg_types.as_slice() {
        impls.push(spans::trait_impl(
            quote!(impl #private::UnaryTask for #ident),
            &where_clause,
            spans::item_over(
                quote!(type Arg =),
                &quote!(#ty),
                quote!(;),
                spans::range(ty),
            ),
            ident.span(),
        ));
    }
    impls
}

pub fn main(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let args = MainArgs::parse(attr, &mut errors);
    let parsed = ast::parse_main(item, &mut errors);
    match (parsed, errors.into_compile_errors()) {
        (Ok(item), None) => {
            let krate = krate(args.krate.as_ref());
            let attrs = &item.attrs;
            let vis = &item.vis;
            let sig = &item.sig;
            let block = &item.block;
            // In a worker, `worker_main` serves tasks and exits; it never returns there.
            // In the parent it returns at once and the user's body runs unchanged.
            quote! {
                #(#attrs)*
                #vis #sig {
                    #krate::__private::worker_main();
                    #block
                }
            }
        }
        (Ok(mut item), Some(compile_errors))
            if item.sig.asyncness.is_some() && item.sig.ident == "main" =>
        {
            // Kept under another name, with an empty `fn main` in its place, so that rustc does
            // not report the `async fn main` a second time in its own words.
            item.sig.ident = format_ident!("__multiproc_async_main", span = item.sig.ident.span());
            quote! {
                #[allow(dead_code)]
                #item
                fn main() {}
                #compile_errors
            }
        }
        (Ok(item), Some(compile_errors)) => quote!(#item #compile_errors),
        (Err(item), compile_errors) => quote!(#item #compile_errors),
    }
}

fn krate(path: Option<&syn::Path>) -> TokenStream {
    path.map_or_else(|| quote!(::multiproc), |path| quote!(#path))
}

/// Docs and `deprecated` go on the public struct (the name callers use; its constant gets
/// `deprecated` too), `cfg`s on every generated item, the rest on the function.
fn split_attrs(attrs: Vec<Attribute>) -> (Vec<Attribute>, Vec<Attribute>, Vec<Attribute>) {
    let mut docs = Vec::new();
    let mut cfgs = Vec::new();
    let mut rest = Vec::new();
    for attr in attrs {
        if attr.path().is_ident("doc") || attr.path().is_ident("deprecated") {
            docs.push(attr);
        } else if attr.path().is_ident("cfg") {
            cfgs.push(attr);
        } else {
            rest.push(attr);
        }
    }
    (docs, cfgs, rest)
}
