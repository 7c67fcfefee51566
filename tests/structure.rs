//! The source layout keeps its shape: the modules of the server crate (`src/`) depend on each
//! other without cycles, so each can be read, tested and changed from the bottom up. A module's
//! dependencies are the `crate::<module>` paths in its code (comments and tests aside).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its code names.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_owned();
            if ["lib", "main", "bin"].contains(&top.as_str()) {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap();
            let deps = graph.entry(top.clone()).or_default();
            for line in code.lines().map(|l| l.split("//").next().unwrap()) {
                for part in line.split("crate::").skip(1) {
                    let name: String = part
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != top {
                        deps.insert(name);
                    }
                }
            }
        }
    }
    graph
}

#[test]
fn modules_depend_on_each_other_without_cycles() {
    let graph = dependencies();
    assert!(graph.len() > 20, "found only {:?}", graph.keys());
    // Peel off modules whose dependencies are all peeled: what is left sits on a cycle.
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut order = Vec::new();
    loop {
        let ready: Vec<String> = graph
            .iter()
            .filter(|(m, deps)| {
                !done.contains(*m) && deps.iter().all(|d| done.contains(d) || !graph.contains_key(d))
            })
            .map(|(m, _)| m.clone())
            .collect();
        if ready.is_empty() {
            break;
        }
        order.push(ready.join(" "));
        done.extend(ready);
    }
    let cyclic: Vec<_> = graph
        .iter()
        .filter(|(m, _)| !done.contains(*m))
        .map(|(m, deps)| {
            format!(
                "{m} -> {:?}",
                deps.iter().filter(|d| !done.contains(*d)).collect::<Vec<_>>()
            )
        })
        .collect();
    assert!(cyclic.is_empty(), "modules on a dependency cycle: {cyclic:#?}");
    eprintln!("layers, bottom up:\n{}", order.join("\n"));
}
