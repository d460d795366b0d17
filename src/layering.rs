//! The import graph of the library's modules, checked: dependencies point one way (no cycle),
//! `config` stays a leaf and the simulator stays on its side of the wire. Read from the source
//! text, so a new `use crate::…` that breaks a rule fails here (issue 9, item 3).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Edges a cycle may still go through, each with the work that removes it.
const KNOWN_CYCLE_EDGES: &[(&str, &str)] = &[];

/// The top-level modules each library module names as `crate::…` outside its tests. A module's
/// folder (`simulator/`, `codec/`, `server/`) counts as the module; the binary's `main.rs` and
/// `cli/` are not the library.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    collect(&src, None, &mut graph);
    graph
}

fn collect(folder: &Path, module: Option<&str>, graph: &mut BTreeMap<String, BTreeSet<String>>) {
    for entry in std::fs::read_dir(folder).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let top_level = module.is_none();
        if top_level && ["main", "cli", "lib", "layering"].contains(&name.as_str()) {
            continue;
        }
        let owner = module.unwrap_or(&name).to_owned();
        if path.is_dir() {
            collect(&path, Some(&owner), graph);
            continue;
        }
        if name == "tests" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let imported = graph.entry(owner.clone()).or_default();
        for (_, rest) in code
            .match_indices("crate::")
            .map(|(at, _)| code.split_at(at + 7))
        {
            let target: String = rest
                .chars()
                .take_while(|character| character.is_ascii_alphanumeric() || *character == '_')
                .collect();
            assert!(
                !target.is_empty(),
                "{}: a grouped `crate::{{…}}` import",
                path.display()
            );
            if target != owner {
                imported.insert(target);
            }
        }
    }
}

/// A cycle through `from`, if there is one, as the modules along it.
fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    let from = path.last().unwrap().clone();
    for to in graph.get(&from).into_iter().flatten() {
        if KNOWN_CYCLE_EDGES.contains(&(from.as_str(), to.as_str())) || done.contains(to) {
            continue;
        }
        if let Some(start) = path.iter().position(|module| module == to) {
            let mut cycle = path[start..].to_vec();
            cycle.push(to.clone());
            return Some(cycle);
        }
        path.push(to.clone());
        if let Some(cycle) = cycle_from(graph, path, done) {
            return Some(cycle);
        }
        path.pop();
    }
    done.insert(from);
    None
}

#[test]
fn the_import_graph_has_no_cycle() {
    let graph = imports();
    assert!(graph.contains_key("server") && graph.contains_key("simulator"));
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        let cycle = cycle_from(&graph, &mut vec![module.clone()], &mut done);
        assert_eq!(cycle, None, "an import cycle:\n{graph:#?}");
    }
}

#[test]
fn config_is_a_leaf_and_the_simulator_keeps_to_its_side_of_the_wire() {
    let graph = imports();
    let config: Vec<&String> = graph["config"].iter().collect();
    assert_eq!(config, ["codec"], "config may only use codec's body cap");
    for gateway_side in [
        "service",
        "upstream",
        "status",
        "request_id",
        "server",
        "auth",
    ] {
        assert!(
            !graph["simulator"].contains(gateway_side),
            "the simulator imports {gateway_side}"
        );
    }
}
