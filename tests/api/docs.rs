//! The repository's documents stay true to the repository: every file they link to or
//! name exists in it (with the heading an anchor points at), and `docs/API.md` has a
//! section for exactly the operations of the OpenAPI document.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use utoipa::OpenApi;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Markdown documents a reader is given.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md"), root().join("ARCHITECTURE.md")];
    docs.extend(files_under(&root().join("docs"), &["md"]));
    docs
}

/// Files under `dir` (recursively) whose extension is one of `extensions`.
fn files_under(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files_under(&path, extensions));
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| extensions.contains(&e))
        {
            found.push(path);
        }
    }
    found.sort();
    found
}

/// The targets of the inline links and images of a Markdown text, `[text](target)`,
/// outside code blocks.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            targets.push(after[..end].trim().to_string());
            rest = &after[end..];
        }
    }
    targets
}

/// The anchors GitHub makes of a Markdown text's headings: lower case, spaces to `-`,
/// every character but letters, digits, `-` and `_` dropped.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut found = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        }
        if in_code || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        found.insert(slug);
    }
    found
}

#[test]
fn every_relative_link_of_the_documents_leads_to_a_file_and_heading_of_the_repository() {
    let mut broken = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        let dir = doc.parent().unwrap();
        let shown = doc.strip_prefix(root()).unwrap_or(&doc).display();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let linked = if file.is_empty() {
                doc.clone()
            } else {
                dir.join(file)
            };
            if !linked.exists() {
                broken.push(format!("{shown}: {target}: no such file"));
                continue;
            }
            if !anchor.is_empty() && linked.extension().is_some_and(|e| e == "md") {
                let headings = anchors(&std::fs::read_to_string(&linked).unwrap());
                if !headings.contains(anchor) {
                    broken.push(format!("{shown}: {target}: no such heading"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// Words of `text` that name a Markdown file (ending in `.md`), with the relative path
/// they may have.
fn markdown_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '/' | '_' | '-')))
        .map(|word| word.trim_end_matches('.').trim_start_matches("./"))
        .filter(|word| word.len() > 3 && word.ends_with(".md") && !word.starts_with('.'))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_markdown_file_the_documents_and_the_code_name_is_in_the_repository() {
    // Not migrations/: an applied migration must never change (refinery keeps its
    // checksum in every database), so their comments keep the names they were written with.
    let mut sources = documents();
    for (dir, extensions) in [
        ("src", &["rs", "html"][..]),
        ("tests", &["rs"][..]),
        ("benches", &["rs"][..]),
        ("config", &["toml"][..]),
        ("packaging", &["service", "env"][..]),
        ("scripts", &["sh"][..]),
    ] {
        sources.extend(files_under(&root().join(dir), extensions));
    }
    sources.extend([root().join("Dockerfile"), root().join("Cargo.toml")]);
    let mut missing = Vec::new();
    for source in &sources {
        let text = std::fs::read_to_string(source).unwrap();
        let dir = source.parent().unwrap();
        for name in markdown_names(&text) {
            // A name is relative to the file naming it, to the root, or to docs/ (the
            // layout tables name `API.md` on the line of `docs/`).
            let places = [dir, root(), &root().join("docs")];
            if !places.iter().any(|place| place.join(&name).exists()) {
                let shown = source.strip_prefix(root()).unwrap_or(source);
                missing.push(format!("{}: {name}", shown.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "documents that are not in the repository are named (refer to docs/API.md or \
         ARCHITECTURE.md instead):\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_markdown_scanners_find_links_names_and_anchors() {
    let text = "See [the API](docs/API.md#tasks), ![x](a.png) and [s](https://e.org).\n\
                ```\n[not](a link)\n```\nThe README.md file, and ./ARCHITECTURE.md.\n\
                ### `POST /result/submit`\n## The TI protocols\n";
    assert_eq!(
        link_targets(text),
        ["docs/API.md#tasks", "a.png", "https://e.org"]
    );
    assert_eq!(
        markdown_names(text).into_iter().collect::<Vec<_>>(),
        ["ARCHITECTURE.md", "README.md", "docs/API.md"]
    );
    let headings = anchors(text);
    assert!(headings.contains("post-resultsubmit"), "{headings:?}");
    assert!(headings.contains("the-ti-protocols"), "{headings:?}");
}

/// `METHOD /path` of every section heading of `docs/API.md` that names an operation.
fn documented_operations(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("### "))
        .map(|title| title.replace('`', ""))
        .filter(|title| {
            title.split_once(' ').is_some_and(|(method, path)| {
                ["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&method)
                    && path.starts_with('/')
                    && !path.contains(' ')
            })
        })
        .collect()
}

#[test]
fn every_endpoint_of_the_openapi_document_is_documented_here_and_no_other() {
    let doc = serde_json::to_value(ti_scheduler::api::ApiDoc::openapi()).unwrap();
    let mut served = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                served.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    assert!(served.contains("POST /queue/submit"), "{served:?}");
    // The OpenAI front door follows OpenAI's API, not this document's conventions (its
    // errors have OpenAI's shape, its keys are not the admin token): it is left out of
    // /openapi.json and documented in docs/API.md all the same.
    for op in [
        "GET /v1/models",
        "POST /v1/chat/completions",
        "POST /v1/completions",
    ] {
        served.insert(op.to_string());
    }
    let documented =
        documented_operations(&std::fs::read_to_string(root().join("docs/API.md")).unwrap());
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && stale.is_empty(),
        "docs/API.md needs a `### METHOD /path` section for {undocumented:?}, and documents \
         {stale:?}, which the service does not serve"
    );
}
