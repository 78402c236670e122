//! Attribute options: `#[task(name = "...", crate = path)]` and `#[main(crate = path)]`.

use proc_macro2::{Span, TokenStream};
use syn::meta::ParseNestedMeta;
use syn::parse::Parser;
use syn::{LitStr, Path};

/// Options accepted by `#[task]`.
#[derive(Default)]
pub struct TaskArgs {
    pub name: Option<LitStr>,
    pub krate: Option<Path>,
}

/// Options accepted by `#[main]`.
#[derive(Default)]
pub struct MainArgs {
    pub krate: Option<Path>,
}

impl TaskArgs {
    pub fn parse(tokens: TokenStream, errors: &mut Errors) -> Self {
        let mut args = TaskArgs::default();
        let parser = syn::meta::parser(|meta| {
            if meta.path.is_ident("name") {
                let lit = parse_name(&meta)?;
                set_once(&meta, &mut args.name, lit, "name")
            } else if meta.path.is_ident("crate") {
                let path = parse_crate(&meta)?;
                set_once(&meta, &mut args.krate, path, "crate")
            } else {
                Err(unknown_key(
                    &meta,
                    "the valid options are `name = \"...\"` and `crate = path`",
                ))
            }
        });
        if let Err(err) = parser.parse2(tokens) {
            errors.push(err);
        }
        args
    }
}

impl MainArgs {
    pub fn parse(tokens: TokenStream, errors: &mut Errors) -> Self {
        let mut args = MainArgs::default();
        let parser = syn::meta::parser(|meta| {
            if meta.path.is_ident("crate") {
                let path = parse_crate(&meta)?;
                set_once(&meta, &mut args.krate, path, "crate")
            } else {
                Err(unknown_key(&meta, "the only option is `crate = path`"))
            }
        });
        if let Err(err) = parser.parse2(tokens) {
            errors.push(err);
        }
        args
    }
}

fn parse_name(meta: &ParseNestedMeta) -> syn::Result<LitStr> {
    let expr: syn::Expr = meta.value()?.parse()?;
    match expr {
        syn::Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Str(lit),
            ..
        }) => {
            if lit.value().is_empty() {
                Err(syn::Error::new(lit.span(), "a task name cannot be empty"))
            } else {
                Ok(lit)
            }
        }
        other => Err(syn::Error::new_spanned(
            other,
            "expected a string literal: `name = \"my_crate::square\"`",
        )),
    }
}

fn parse_crate(meta: &ParseNestedMeta) -> syn::Result<Path> {
    let value = meta.value()?;
    if value.peek(LitStr) {
        let lit: LitStr = value.parse()?;
        return Err(syn::Error::new(
            lit.span(),
            "expected a path, not a string: `crate = ::my_facade::multiproc`",
        ));
    }
    value.parse::<Path>().map_err(|err| {
        syn::Error::new(
            err.span(),
            "expected a path to the multiproc crate: `crate = ::my_facade::multiproc`",
        )
    })
}

fn set_once<T>(
    meta: &ParseNestedMeta,
    slot: &mut Option<T>,
    value: T,
    key: &str,
) -> syn::Result<()> {
    if slot.is_some() {
        return Err(meta.error(format!("duplicate `{key}` option: give it once")));
    }
    *slot = Some(value);
    Ok(())
}

/// `valid` ends the message: the options that are accepted, as a sentence.
fn unknown_key(meta: &ParseNestedMeta, valid: &str) -> syn::Error {
    let key = meta.path.get_ident().map_or_else(
        || quote::ToTokens::to_token_stream(&meta.path).to_string(),
        ToString::to_string,
    );
    meta.error(format!("unknown option `{key}`: {valid}"))
}

/// Every problem found in one expansion, reported together (`serde_derive`'s `Ctxt`).
#[derive(Default)]
pub struct Errors(Option<syn::Error>);

impl Errors {
    pub fn push(&mut self, err: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(err),
            None => self.0 = Some(err),
        }
    }

    pub fn error(&mut self, span: Span, message: impl std::fmt::Display) {
        self.push(syn::Error::new(span, message));
    }

    /// An error underlining all of `tokens`, not only their first token.
    pub fn error_spanned(&mut self, tokens: impl quote::ToTokens, message: impl std::fmt::Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    /// Appends every error of `other`, after those already here.
    pub fn append(&mut self, other: Errors) {
        if let Some(err) = other.0 {
            self.push(err);
        }
    }

    pub fn into_compile_errors(self) -> Option<TokenStream> {
        self.0.map(|err| err.to_compile_error())
    }
}
