//! Where the compiler's errors about generated code point. Generated tokens carry the spans of
//! the user's tokens they stand for, so an error lands on the user's type or function name
//! rather than on `#[multiproc::task]` with "this error originates in the attribute macro".
//!
//! On stable a proc macro cannot join two spans into one, but the compiler spans an item or a
//! path from its first token to its last: generated tokens placed at the two ends of a user's
//! type make the compiler underline all of it.

use proc_macro2::{Delimiter, Group, Span, TokenStream, TokenTree};
use quote::{ToTokens, quote};
use syn::{GenericArgument, PathArguments, Type};

/// `#header #where_clause { #body }` whose header and braces point at `span` (the function's
/// name): the compiler's "the trait `Task` is implemented for `square`" and "required for
/// `square` to implement `Task`" then show the user's function.
pub fn trait_impl(
    header: TokenStream,
    where_clause: &TokenStream,
    body: TokenStream,
    span: Span,
) -> TokenStream {
    let header = respan(header, span);
    let mut body = Group::new(Delimiter::Brace, body);
    body.set_span(span);
    quote!(#header #where_clause #body)
}

/// `#head #ty #tail` (an associated type), whose span as an item is `range`, while `ty` keeps
/// its own spans.
pub fn item_over(
    head: TokenStream,
    ty: &TokenStream,
    tail: TokenStream,
    range: (Span, Span),
) -> TokenStream {
    let head = respan(head, range.0);
    let tail = respan(tail, range.1);
    quote!(#head #ty #tail)
}

/// `for<'__multiproc> #ty: #krate::Payload`, whose span covers the user's type so that the
/// compiler's "unsatisfied trait bound introduced here" underlines it. The compiler takes the
/// predicate's span from its bound: the bound path starts at the type's first token and ends at
/// its last.
pub fn payload_bound(ty: &Type, krate: &TokenStream) -> TokenStream {
    let (first, last) = range(ty);
    let head = respan(quote!(for<'__multiproc>), first);
    let krate = respan(krate.clone(), first);
    let payload = respan(quote!(Payload), last);
    quote!(#head #ty: #krate::#payload)
}

/// `#ident<>` (the same type as `#ident`) spanning the type that most likely makes the task
/// fail "`T` cannot be sent between processes", for the registry entry where that error is
/// reported: the one argument or return type that is not a well-known std payload when there
/// is exactly one (the usual case: `fn norm(p: Point) -> f64` points at `Point`), else the
/// function's name. The message names the failing type either way; this only places the caret.
pub fn registered(ident: &syn::Ident, payload_types: &[&Type]) -> TokenStream {
    let mut unknown = payload_types.iter().filter(|ty| !is_std_payload(ty));
    let (first, last) = match (unknown.next(), unknown.next()) {
        (Some(only), None) => range(only),
        _ => (ident.span(), ident.span()),
    };
    let mut ident = ident.clone();
    ident.set_span(first);
    let empty_args = respan(quote!(<>), last);
    quote!(#ident #empty_args)
}

/// Whether `ty` names a std type that is always a payload (`u64`, `String`, `Vec<u8>`,
/// `Option<(bool, f64)>`, ...). Goes by names, so a user type called `String` fools it; that
/// only moves a caret, see [`registered`].
fn is_std_payload(ty: &Type) -> bool {
    const PLAIN: &[&str] = &[
        "bool", "char", "String", "f32", "f64", "u8", "u16", "u32", "u64", "u128", "usize", "i8",
        "i16", "i32", "i64", "i128", "isize",
    ];
    const GENERIC: &[&str] = &["Vec", "Option", "Box", "Result"];
    match ty {
        Type::Paren(paren) => is_std_payload(&paren.elem),
        Type::Group(group) => is_std_payload(&group.elem),
        Type::Tuple(tuple) => tuple.elems.iter().all(is_std_payload),
        Type::Path(path) if path.qself.is_none() && path.path.segments.len() == 1 => {
            let segment = &path.path.segments[0];
            let name = segment.ident.to_string();
            match &segment.arguments {
                PathArguments::None => PLAIN.contains(&name.as_str()),
                PathArguments::AngleBracketed(args) => GENERIC.contains(&name.as_str())
                    && args.args.iter().all(
                        |arg| matches!(arg, GenericArgument::Type(inner) if is_std_payload(inner)),
                    ),
                PathArguments::Parenthesized(_) => false,
            }
        }
        _ => false,
    }
}

/// The spans of the first and the last token of `tokens`.
pub fn range(tokens: impl ToTokens) -> (Span, Span) {
    let tokens = tokens.into_token_stream();
    let first = tokens
        .clone()
        .into_iter()
        .next()
        .map_or_else(Span::call_site, |tree| match tree {
            TokenTree::Group(group) => group.span_open(),
            other => other.span(),
        });
    let last = tokens.into_iter().last().map_or(first, |tree| match tree {
        TokenTree::Group(group) => group.span_close(),
        other => other.span(),
    });
    (first, last)
}

/// `tokens` with every span set to `span`.
pub fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut tree| {
            if let TokenTree::Group(group) = &tree {
                let mut inner = Group::new(group.delimiter(), respan(group.stream(), span));
                inner.set_span(span);
                tree = TokenTree::Group(inner);
            } else {
                tree.set_span(span);
            }
            tree
        })
        .collect()
}
