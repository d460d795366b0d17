//! The task-interface shape: which element trees are a method call
//! (`<methodcall><name/><params/></methodcall>`) or a reply (`<response>` holding `<params>` or
//! `<fault><code/></fault>`). Both wire formats are read into the same trees, so both pass exactly
//! these checks.

use super::{DecodeError, Element, MethodCall, Reply, is_xml_whitespace, shorten};

/// The checks every reply passes, whichever format it came in.
pub(super) fn reply_from_response(response: &Element) -> Result<Reply, DecodeError> {
    expect_root(response, "response")?;
    expect_no_text(response)?;
    let [params, fault] = distinct_children(response, ["params", "fault"])?;
    match (params, fault) {
        (Some(params), None) => {
            expect_no_text(params)?;
            Ok(Reply::Success(params.clone()))
        }
        (None, Some(fault)) => {
            expect_no_text(fault)?;
            let [code] = distinct_children(fault, ["code"])?;
            let code = code.ok_or_else(|| missing(fault, "code"))?;
            Ok(Reply::Fault(parse_integer(code)?))
        }
        (Some(_), Some(_)) => Err(DecodeError::ParamsAndFault),
        (None, None) => Err(missing(response, "params")),
    }
}

/// The checks every method call passes, whichever format it came in.
pub(super) fn method_call_from_element(methodcall: &Element) -> Result<MethodCall, DecodeError> {
    expect_root(methodcall, "methodcall")?;
    expect_no_text(methodcall)?;
    let [name, params] = distinct_children(methodcall, ["name", "params"])?;
    let name = name.ok_or_else(|| missing(methodcall, "name"))?;
    if let Some(child) = name.children.first() {
        return Err(unexpected_element(name, child));
    }
    let params = params.ok_or_else(|| missing(methodcall, "params"))?;
    expect_no_text(params)?;
    Ok(MethodCall {
        name: name.text.trim().to_owned(),
        params: params.children.clone(),
    })
}

/// Reads an element's text as a non-negative decimal integer, allowing surrounding whitespace.
pub fn parse_integer(element: &Element) -> Result<u32, DecodeError> {
    let invalid = || DecodeError::InvalidInteger {
        element: element.name.clone(),
        text: shorten(&element.text),
    };
    if let Some(child) = element.children.first() {
        return Err(unexpected_element(element, child));
    }
    let digits = element.text.trim_matches(is_xml_whitespace);
    // `u32::from_str` would also take a leading `+`, which no controller sends.
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(invalid());
    }
    digits.parse().map_err(|_| invalid())
}

fn expect_root(element: &Element, expected: &'static str) -> Result<(), DecodeError> {
    if element.name == expected {
        Ok(())
    } else {
        Err(DecodeError::UnexpectedRoot {
            expected,
            found: shorten(&element.name),
        })
    }
}

pub(super) fn expect_no_text(element: &Element) -> Result<(), DecodeError> {
    if element.text.chars().all(is_xml_whitespace) {
        Ok(())
    } else {
        Err(DecodeError::UnexpectedText {
            element: element.name.clone(),
            text: shorten(element.text.trim_matches(is_xml_whitespace)),
        })
    }
}

/// The children of `parent` with the given names, each at most once; any other child is an error.
pub(super) fn distinct_children<'a, const N: usize>(
    parent: &'a Element,
    names: [&'static str; N],
) -> Result<[Option<&'a Element>; N], DecodeError> {
    let mut found = [None; N];
    for child in &parent.children {
        let Some(index) = names.iter().position(|name| *name == child.name) else {
            return Err(unexpected_element(parent, child));
        };
        if found[index].replace(child).is_some() {
            return Err(DecodeError::DuplicateElement {
                parent: parent.name.clone(),
                name: child.name.clone(),
            });
        }
    }
    Ok(found)
}

pub(super) fn missing(parent: &Element, name: &'static str) -> DecodeError {
    DecodeError::MissingElement {
        parent: parent.name.clone(),
        name,
    }
}

pub(super) fn unexpected_element(parent: &Element, child: &Element) -> DecodeError {
    DecodeError::UnexpectedElement {
        parent: parent.name.clone(),
        name: shorten(&child.name),
    }
}
