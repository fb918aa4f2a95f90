//! The README's first command, `cargo run --release --example demo`, as a test: the example's own
//! [`run`](example::run) (in-memory upstream, proxy, client, Group export, membership check), so CI
//! proves the demo works without building and launching a second binary.

#[path = "../../examples/demo.rs"]
#[allow(dead_code)] // the example's `main`
mod example;

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_exports_its_group_and_the_patients_are_the_members() {
    let mut out = Vec::new();
    let result = example::run(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let outcome = result.unwrap_or_else(|e| panic!("the demo failed: {e:#}\n{text}"));

    assert_eq!(outcome.members.len(), 10, "{text}");
    assert_eq!(outcome.patients, outcome.members);
    assert_eq!(outcome.counts["Patient"], 10);
    // What was downloaded is what the manifest announced, type by type.
    let mut announced = std::collections::BTreeMap::<String, u64>::new();
    for file in outcome.manifest["output"].as_array().unwrap() {
        *announced
            .entry(file["type"].as_str().unwrap().to_owned())
            .or_default() += file["count"].as_u64().unwrap();
    }
    assert_eq!(outcome.counts, announced);
    assert!(outcome.counts.contains_key("Observation"));
    // The story a first-time user reads.
    for step in [
        "1. token",
        "2. kick-off",
        "200 OK: the manifest",
        "4. downloads",
        "✓",
    ] {
        assert!(
            text.contains(step),
            "no {step:?} in the demo's output:\n{text}"
        );
    }
    assert!(text.contains(&outcome.status_url));
}
