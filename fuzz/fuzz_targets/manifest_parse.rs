//! Manifest parsing on arbitrary text: it must never panic, bounded input must stay cheap,
//! and every object it accepts must carry a name the API server would accept.
#![no_main]

use hapair_crds::manifest::parse_documents;
use hapair_crds::validation::{check_namespace, check_object_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (documents, errors) = parse_documents("fuzz.yaml", text);
    for doc in documents {
        assert!(check_object_name(doc.object.name()).is_ok());
        assert!(check_namespace(doc.object.namespace()).is_ok());
    }
    assert!(errors.iter().all(|e| e.file == "fuzz.yaml"));
});
