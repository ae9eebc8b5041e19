//! `#[derive(Trace)]` for pymalloc's cycle collector.
//!
//! The derive emits an `unsafe impl`, and its users write no `unsafe`: the
//! generated `trace` destructures `self` and calls each field's own `Trace`,
//! so it visits exactly the handles the fields own (`Trace`'s safety
//! contract holds as long as the fields' impls keep it).
//!
//! * structs and enums, with generics (each type parameter gets a
//!   `pymalloc::Trace` bound);
//! * `#[trace(skip)]` on a field leaves it out (a `Cc` in it then counts as a
//!   reference from outside: never collected through that field, a leak and
//!   never unsound);
//! * `#[trace(finalize)]` on the type sets `Trace::FINALIZER` to the type's
//!   `pymalloc::Finalize` impl;
//! * `#[trace(crate = path)]` on the type names the crate where it is not
//!   `::pymalloc` (a renamed dependency, or a re-export);
//! * an option in the wrong place (`skip` on the type or a variant,
//!   `finalize` or `crate` on a field or variant) is a compile error;
//! * self-referential types: `MAY_CONTAIN_CC` is computed from the field
//!   types, except that a field whose type names the type itself is judged
//!   by its tokens (it adds nothing unless it also names something that may
//!   hold a `Cc`), which avoids a compile-time cycle.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2, TokenTree};
use quote::{format_ident, quote};
use syn::{
    parse_macro_input, parse_quote, Attribute, Data, DeriveInput, Fields, Ident, Path, Type,
};

/// Derives `pymalloc::Trace`.
#[proc_macro_derive(Trace, attributes(trace))]
pub fn derive_trace(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand(input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// Containers and leaves that cannot hold a `Cc` unless their parameters do.
const CC_FREE: &[&str] = &[
    "Self",
    "Box",
    "Option",
    "Vec",
    "VecDeque",
    "RefCell",
    "Cell",
    "String",
    "BTreeMap",
    "BTreeSet",
    "HashMap",
    "HashSet",
    "Weak",
    "Result",
    "std",
    "alloc",
    "core",
    "boxed",
    "vec",
    "collections",
    "cell",
    "option",
    "string",
    "pymalloc",
    "bool",
    "char",
    "str",
    "u8",
    "u16",
    "u32",
    "u64",
    "u128",
    "usize",
    "i8",
    "i16",
    "i32",
    "i64",
    "i128",
    "isize",
    "f32",
    "f64",
];

fn expand(input: DeriveInput) -> syn::Result<TokenStream2> {
    let name = &input.ident;
    let options = Options::parse(&input.attrs, Place::Type)?;
    let finalize = options.finalize;
    let krate = options.krate.unwrap_or_else(|| parse_quote!(::pymalloc));
    let mut generics = input.generics.clone();
    for param in generics.type_params_mut() {
        param.bounds.push(parse_quote!(#krate::Trace));
    }
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();

    let mut field_types = Vec::new();
    let body = match &input.data {
        Data::Struct(data) => {
            let (pattern, visits) = destructure(&data.fields, &mut field_types, &krate)?;
            quote! {
                let Self #pattern = self;
                #(#visits)*
            }
        }
        Data::Enum(data) => {
            let mut arms = Vec::new();
            for variant in &data.variants {
                let ident = &variant.ident;
                Options::parse(&variant.attrs, Place::Variant)?;
                let (pattern, visits) = destructure(&variant.fields, &mut field_types, &krate)?;
                arms.push(quote! { Self::#ident #pattern => { #(#visits)* } });
            }
            quote! {
                match self {
                    #(#arms)*
                    #[allow(unreachable_patterns)]
                    _ => {}
                }
            }
        }
        Data::Union(data) => {
            return Err(syn::Error::new(
                data.union_token.span,
                "Trace cannot be derived for unions",
            ))
        }
    };

    let may_contain = field_types.iter().map(|ty| may_contain(ty, name, &krate));
    let finalize = finalize.then(|| {
        quote! {
            const FINALIZER: ::core::option::Option<fn(&Self)> =
                ::core::option::Option::Some(<Self as #krate::Finalize>::finalize);
        }
    });
    Ok(quote! {
        unsafe impl #impl_generics #krate::Trace for #name #ty_generics #where_clause {
            const MAY_CONTAIN_CC: bool = false #(|| #may_contain)*;
            #finalize

            #[allow(unused_variables)]
            fn trace(&self, visitor: &mut #krate::Visitor<'_>) {
                #body
            }
        }
    })
}

/// A pattern binding the traced fields, and the calls that trace them.
fn destructure(
    fields: &Fields,
    types: &mut Vec<Type>,
    krate: &Path,
) -> syn::Result<(TokenStream2, Vec<TokenStream2>)> {
    let mut bindings = Vec::new();
    let mut visits = Vec::new();
    for (index, field) in fields.iter().enumerate() {
        let binding = format_ident!("__field{}", index);
        if Options::parse(&field.attrs, Place::Field)?.skip {
            bindings.push(match &field.ident {
                Some(ident) => quote!(#ident: _),
                None => quote!(_),
            });
            continue;
        }
        types.push(field.ty.clone());
        visits.push(quote! { #krate::Trace::trace(#binding, visitor); });
        bindings.push(match &field.ident {
            Some(ident) => quote!(#ident: #binding),
            None => quote!(#binding),
        });
    }
    let pattern = match fields {
        Fields::Named(_) => quote!({ #(#bindings),* }),
        Fields::Unnamed(_) => quote!(( #(#bindings),* )),
        Fields::Unit => quote!(),
    };
    Ok((pattern, visits))
}

/// The field's contribution to `MAY_CONTAIN_CC`.
fn may_contain(ty: &Type, own: &Ident, krate: &Path) -> TokenStream2 {
    let mut idents = Vec::new();
    collect_idents(quote!(#ty), &mut idents);
    if !idents.iter().any(|i| i == own || i == "Self") {
        return quote!(<#ty as #krate::Trace>::MAY_CONTAIN_CC);
    }
    // Naming our own type: asking for its constant would be a cycle. The
    // recursion adds nothing new, so only other names matter.
    let other = idents
        .iter()
        .any(|i| i != own && !CC_FREE.iter().any(|free| i == free));
    let value = syn::LitBool::new(other, Span::call_site());
    quote!(#value)
}

fn collect_idents(tokens: TokenStream2, out: &mut Vec<Ident>) {
    for token in tokens {
        match token {
            TokenTree::Ident(ident) => out.push(ident),
            TokenTree::Group(group) => collect_idents(group.stream(), out),
            _ => {}
        }
    }
}

/// Where `#[trace(...)]` options are written.
#[derive(Clone, Copy, PartialEq)]
enum Place {
    Type,
    Variant,
    Field,
}

/// The `#[trace(...)]` options of one item.
#[derive(Default)]
struct Options {
    skip: bool,
    finalize: bool,
    krate: Option<Path>,
}

impl Options {
    /// Reads the options among `attrs`, rejecting unknown ones and those
    /// that mean nothing at `place` (which would otherwise be ignored
    /// silently: a `skip` on a variant would leave its fields traced).
    fn parse(attrs: &[Attribute], place: Place) -> syn::Result<Options> {
        let mut options = Options::default();
        for attr in attrs.iter().filter(|a| a.path().is_ident("trace")) {
            attr.parse_nested_meta(|meta| {
                let wrong = |option: &str, right: &str| {
                    let here = match place {
                        Place::Type => "the type",
                        Place::Variant => "a variant",
                        Place::Field => "a field",
                    };
                    Err(meta.error(format!(
                        "`#[trace({option})]` belongs on {right}, not on {here}"
                    )))
                };
                if meta.path.is_ident("skip") {
                    if place != Place::Field {
                        return wrong("skip", "a field");
                    }
                    options.skip = true;
                } else if meta.path.is_ident("finalize") {
                    if place != Place::Type {
                        return wrong("finalize", "the type");
                    }
                    options.finalize = true;
                } else if meta.path.is_ident("crate") {
                    if place != Place::Type {
                        return wrong("crate = ...", "the type");
                    }
                    options.krate = Some(meta.value()?.parse()?);
                } else {
                    return Err(meta.error("expected `skip`, `finalize` or `crate = path`"));
                }
                Ok(())
            })?;
        }
        Ok(options)
    }
}
