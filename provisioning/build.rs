//! svs-provision links the soft token in as its default ("embedded") module
//! and opens it with `Pkcs11::new_from_self()`, which looks the PKCS#11 entry
//! points up in the executable's dynamic symbol table; a normal executable
//! does not export them.

fn main() {
    for symbol in ["C_GetFunctionList", "C_GetInterfaceList", "C_GetInterface"] {
        println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol={symbol}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
