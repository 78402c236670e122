//! Code generation. Every path goes through `#krate::__private`, so users never depend on
//! inventory or serde themselves (typetag's `__private` pattern).
//!
//! For `#[task] fn square(x: u64) -> u64 { .. }` this emits, in the user's module:
//! - `struct square;` (a unit value with the function's name and docs) that derefs to
//!   `fn(u64) -> u64`, so `square(3)` still calls the function directly and `square` is a
//!   value `pool.map` accepts;
//! - the function itself, renamed `__multiproc_task_square`;
//! - `impl Task for square` (name, argument tuple, output) and, for one argument, `UnaryTask`;
//! - a registry entry submitted with `inventory`, found by name in a worker process;
//! - a type check per argument, spanned on the user's type so errors point there.

use crate::args::{Errors, MainArgs, TaskArgs};
use crate::ast;
use proc_macro2::TokenStream;
use quote::{format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Attribute, ReturnType};

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

    let (docs, cfgs, fn_attrs) = split_attrs(std::mem::take(&mut item.attrs));
    item.attrs = cfgs.iter().cloned().chain(fn_attrs).collect();

    let name = if let Some(lit) = &args.name {
        quote!(#lit)
    } else {
        let unraw = ident.unraw().to_string();
        quote!(::core::concat!(::core::module_path!(), "::", #unraw))
    };
    let arg_types = &task.arg_types;
    let vars: Vec<_> = (0..arg_types.len())
        .map(|i| format_ident!("__arg{i}"))
        .collect();
    let output = match &item.sig.output {
        ReturnType::Default => quote!(()),
        ReturnType::Type(_, ty) => quote!(#ty),
    };

    // The caret of a missing Serialize/Deserialize sits under the user's own type.
    let type_checks = arg_types
        .iter()
        .map(|ty| quote_spanned!(ty.span()=> #private::assert_payload::<#ty>();))
        .chain(match &item.sig.output {
            ReturnType::Default => None,
            ReturnType::Type(_, ty) => {
                Some(quote_spanned!(ty.span()=> #private::assert_payload::<#ty>();))
            }
        });

    let unary = (arg_types.len() == 1).then(|| {
        let ty = &arg_types[0];
        quote! {
            #(#cfgs)*
            impl #private::UnaryTask for #ident {
                type Arg = #ty;
            }
        }
    });

    quote! {
        #(#cfgs)*
        #(#docs)*
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        #vis struct #ident;

        #[doc(hidden)]
        // Tasks take owned arguments by design: they arrive by value from another process.
        #[allow(clippy::needless_pass_by_value)]
        #item

        #(#cfgs)*
        impl ::core::ops::Deref for #ident {
            type Target = fn(#(#arg_types),*) -> #output;
            fn deref(&self) -> &Self::Target {
                const FUNCTION: fn(#(#arg_types),*) -> #output = #hidden;
                &FUNCTION
            }
        }

        #(#cfgs)*
        impl #private::Task for #ident {
            type Args = (#(#arg_types,)*);
            type Output = #output;
            const NAME: &'static str = #name;
            #[inline]
            fn call(args: Self::Args) -> Self::Output {
                let (#(#vars,)*) = args;
                #hidden(#(#vars),*)
            }
        }

        #unary

        #(#cfgs)*
        #private::inventory::submit! {
            #private::TaskEntry::new::<#ident>(::core::file!(), ::core::line!())
        }

        #(#cfgs)*
        const _: fn() = || {
            #(#type_checks)*
        };
    }
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
        (Ok(item), Some(compile_errors)) => quote!(#item #compile_errors),
        (Err(item), compile_errors) => quote!(#item #compile_errors),
    }
}

fn krate(path: Option<&syn::Path>) -> TokenStream {
    path.map_or_else(|| quote!(::multiproc), |path| quote!(#path))
}

/// Docs go on the public unit struct, `cfg`s on every generated item, the rest on the function.
fn split_attrs(attrs: Vec<Attribute>) -> (Vec<Attribute>, Vec<Attribute>, Vec<Attribute>) {
    let mut docs = Vec::new();
    let mut cfgs = Vec::new();
    let mut rest = Vec::new();
    for attr in attrs {
        if attr.path().is_ident("doc") {
            docs.push(attr);
        } else if attr.path().is_ident("cfg") {
            cfgs.push(attr);
        } else {
            rest.push(attr);
        }
    }
    (docs, cfgs, rest)
}
