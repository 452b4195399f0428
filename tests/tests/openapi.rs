//! docs/openapi.json describes exactly the routes svsd serves, and every
//! error code the server can send.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

#[test]
fn openapi_document_matches_the_routes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
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
