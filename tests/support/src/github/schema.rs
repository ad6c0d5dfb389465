//! Which GitHub operation a request is, and whether its body fits the operation's schema,
//! both from GitHub's OpenAPI description.

use serde_json::Value;

use crate::fixtures::openapi;

/// Finds the OpenAPI path template matching a concrete path.
pub(super) fn match_template(path: &str, method: &str) -> Option<(String, Value)> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let paths = openapi()["paths"].as_object().unwrap();
    for (template, item) in paths {
        let t: Vec<&str> = template.split('/').collect();
        if t.len() != segs.len() {
            continue;
        }
        let fits = t
            .iter()
            .zip(&segs)
            .all(|(a, b)| (a.starts_with('{') && a.ends_with('}') && !b.is_empty()) || a == b);
        if fits {
            if let Some(op) = item.get(method) {
                return Some((template.clone(), op.clone()));
            }
        }
    }
    None
}

pub(super) fn resolve<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    let mut v = doc;
    for part in reference.trim_start_matches("#/").split('/') {
        v = &v[part];
    }
    v
}

/// A small JSON Schema check covering what GitHub's request bodies use.
pub(super) fn validate(v: &Value, schema: &Value, at: &str, errs: &mut Vec<String>) {
    let doc = openapi();
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        return validate(v, resolve(doc, r), at, errs);
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "object" => v.is_object(),
            "array" => v.is_array(),
            "null" => v.is_null(),
            _ => false,
        });
        if !ok {
            errs.push(format!("{at}: {v} is not of type {types:?}"));
            return;
        }
    }
    if let Some(en) = schema.get("enum").and_then(Value::as_array) {
        if !en.contains(v) {
            errs.push(format!("{at}: {v} not in {en:?}"));
        }
    }
    if let Some(obj) = v.as_object() {
        for req in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !obj.contains_key(req.as_str().unwrap()) {
                errs.push(format!("{at}: missing required {req}"));
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(val, s, &format!("{at}.{k}"), errs),
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errs.push(format!("{at}: unexpected property {k}"))
                }
                None => {}
            }
        }
    }
    if let Some(arr) = v.as_array() {
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64) {
            if (arr.len() as u64) < min {
                errs.push(format!("{at}: fewer than {min} items"));
            }
        }
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
            if arr.len() as u64 > max {
                errs.push(format!("{at}: more than {max} items"));
            }
        }
        if let Some(items) = schema.get("items") {
            for (i, item) in arr.iter().enumerate() {
                validate(item, items, &format!("{at}[{i}]"), errs);
            }
        }
    }
    for s in schema
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        validate(v, s, at, errs);
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(alts) = schema.get(key).and_then(Value::as_array) {
            let any = alts.iter().any(|s| {
                let mut e = Vec::new();
                validate(v, s, at, &mut e);
                e.is_empty()
            });
            if !any {
                errs.push(format!("{at}: matches none of {key}"));
            }
        }
    }
}
