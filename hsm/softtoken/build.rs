//! The demo example opens the token linked into its own executable
//! (`Pkcs11::new_from_self`), which needs the PKCS#11 entry points in the
//! executable's dynamic symbol table; a normal executable does not export
//! them.

fn main() {
    for symbol in ["C_GetFunctionList", "C_GetInterfaceList", "C_GetInterface"] {
        println!("cargo:rustc-link-arg-examples=-Wl,--export-dynamic-symbol={symbol}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
