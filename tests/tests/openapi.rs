//! docs/openapi.json describes exactly the routes svsd serves, every error
//! code the server can send, and answers by strict schemas (the
//! Schemathesis test, tests/schemathesis.rs, checks real answers against
//! them).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use serde_json::Value;

#[test]
fn openapi_document_matches_the_routes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = BTreeSet::new();
    for (p, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.clone(), p.clone()));
        }
    }
    let served: BTreeSet<_> = svs_appliance::app::ROUTES
        .iter()
        .map(|r| (r.method.to_lowercase(), r.template.to_owned()))
        .collect();
    assert_eq!(documented, served);
    // Every templated route resolves in the router.
    for r in svs_appliance::app::ROUTES {
        let concrete = r.template.replace("{name}", "demo");
        assert!(
            svs_appliance::app::Route::parse(r.method, &concrete).is_ok(),
            "{} {}",
            r.method,
            r.template
        );
    }
    let codes: BTreeSet<_> =
        doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect();
    for code in svs_appliance::error::ALL_CODES {
        assert!(codes.contains(*code), "error code {code} is not documented");
    }
}

/// Follows a local `$ref`.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(r) => doc.pointer(r.strip_prefix('#').unwrap()).unwrap(),
        None => v,
    }
}

/// Every object schema under `v` names its fields, allows no others, and
/// requires at least one.
fn assert_strict(doc: &Value, v: &Value, at: &str) {
    let v = resolve(doc, v);
    if v["type"] == "object" {
        assert_eq!(v["additionalProperties"], false, "{at}");
        assert!(v["properties"].is_object(), "{at}");
        assert!(
            v["required"].as_array().is_some_and(|r| !r.is_empty()),
            "{at}"
        );
        for (name, p) in v["properties"].as_object().unwrap() {
            assert_strict(doc, p, &format!("{at}.{name}"));
        }
    }
    if let Some(items) = v.get("items") {
        assert_strict(doc, items, &format!("{at}[]"));
    }
    for alt in v["oneOf"].as_array().into_iter().flatten() {
        assert_strict(doc, alt, at);
    }
}

#[test]
fn every_answer_has_a_strict_schema() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut answers = 0;
    for (p, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for (status, r) in op["responses"].as_object().unwrap() {
                let r = resolve(&doc, r);
                let schema = &r["content"]["application/json"]["schema"];
                assert!(schema.is_object(), "{method} {p} {status}: no JSON schema");
                assert_strict(&doc, schema, &format!("{method} {p} {status}"));
                answers += 1;
            }
            // A 429 always says when to retry, a 405 what is allowed.
            for (status, header) in [("429", "Retry-After"), ("405", "Allow")] {
                if let Some(r) = op["responses"].get(status) {
                    let h = &resolve(&doc, r)["headers"][header];
                    assert_eq!(h["required"], true, "{method} {p} {status}");
                }
            }
        }
    }
    assert!(answers > 50, "{answers}");
}
