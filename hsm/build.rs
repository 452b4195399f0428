//! Tests and benches load the soft token from their own executable
//! (`Pkcs11::new_from_self`), which needs its PKCS#11 entry points in the
//! dynamic symbol table; a normal executable does not export them.

fn main() {
    for symbol in ["C_GetFunctionList", "C_GetInterfaceList", "C_GetInterface"] {
        println!("cargo:rustc-link-arg-tests=-Wl,--export-dynamic-symbol={symbol}");
        println!("cargo:rustc-link-arg-benches=-Wl,--export-dynamic-symbol={symbol}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
