//! A template rendered with coord's functions over arbitrary etcd data: it
//! never panics, renders the same twice, and never reaches for etcd when
//! everything is already in the view (a view covering the whole keyspace).
//! The template comes from the operator; the keys and values from anyone
//! who may write to etcd.

#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use coord::agent::files::{RenderError, Renderer};
use coord::agent::manifest::Manifest;
use coord::etcd::{CacheSnapshot, Client, ConnectOptions, KeyValue, ReadSet};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    template: String,
    kvs: Vec<(String, Vec<u8>)>,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    // A TOML literal string cannot hold its own delimiter.
    if input.template.contains("'''") || input.template.contains('\0') {
        return;
    }
    let text = format!(
        "[agent]\nname = \"fuzz\"\n[[file]]\npath = \"/fuzz/out\"\nsource = '''{}'''\n",
        input.template
    );
    let Ok(manifest) = Manifest::parse(Path::new("/fuzz/agent.toml"), &text) else {
        return;
    };
    let Some(spec) = manifest.files.first() else {
        return;
    };
    let view = CacheSnapshot::from_parts(
        7,
        input.kvs.into_iter().map(|(key, value)| KeyValue {
            key,
            value,
            create_revision: 1,
            mod_revision: 7,
            version: 1,
            lease: None,
        }),
    );
    let mut everything = ReadSet::default();
    everything.add_prefix("");
    runtime().block_on(async {
        // Never dialled: nothing is read from etcd when the view covers
        // every key.
        let client = Client::connect(&ConnectOptions::new(vec!["http://127.0.0.1:9".into()]))
            .await
            .expect("client");
        let mut renderer = Renderer::new("/coord").with_agent("fuzz");
        let first = renderer
            .render(spec, &client, &everything, Some(view.clone()), None)
            .await;
        let second = renderer
            .render(spec, &client, &everything, Some(view), None)
            .await;
        if let Err(RenderError::Read { source, .. }) = &first.result {
            panic!("read etcd although the view had everything: {source}");
        }
        assert_eq!(
            first.result.as_ref().ok(),
            second.result.as_ref().ok(),
            "two renders of one view differ"
        );
        let _ = first.result.map_err(|e| e.to_string());
    });
});
