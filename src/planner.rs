//! Gathers what a plan needs and makes it: the desired touchpoints (already loaded), their secrets
//! resolved to keyed fingerprints, and the live state from the registry; then [`plan::diff`].

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;

use crate::load::Desired;
use crate::plan::{self, DesiredSpec, Plan, RegistryRef, Source};
use crate::registry::{Registry, RegistryError, now};

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Some secret references could not be read; every one is listed.
    #[error("cannot read {} secret(s):\n{}", .0.len(), .0.join("\n"))]
    Secrets(Vec<String>),
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Fingerprints every secret of every desired touchpoint under the registry's key.
pub fn fingerprints(
    desired: &Desired,
    registry: &dyn Registry,
) -> Result<Vec<BTreeMap<String, String>>, PlanError> {
    let fp = registry.fingerprinter();
    let results: Vec<Result<BTreeMap<String, String>, Vec<String>>> = desired
        .touchpoints
        .par_iter()
        .map(|l| {
            let mut out = BTreeMap::new();
            let mut errors = Vec::new();
            for (path, r) in l.touchpoint.secrets() {
                match r.resolve(&l.dir) {
                    Ok(secret) => {
                        out.insert(path.to_string(), fp.fingerprint(&secret));
                    }
                    Err(e) => errors.push(format!("  {}: `{path}` {r}: {e}", l.file)),
                }
            }
            if errors.is_empty() {
                Ok(out)
            } else {
                Err(errors)
            }
        })
        .collect();
    let mut all = Vec::with_capacity(results.len());
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(f) => all.push(f),
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(all)
    } else {
        Err(PlanError::Secrets(errors))
    }
}

/// Makes the plan that brings `registry` to `desired`, which was read from `dir`.
pub fn make_plan(
    desired: &Desired,
    dir: &Path,
    registry: &dyn Registry,
) -> Result<Plan, PlanError> {
    let fps = fingerprints(desired, registry)?;
    let live = registry.list()?;
    let specs: Vec<DesiredSpec<'_>> = desired
        .touchpoints
        .iter()
        .zip(fps)
        .map(|(l, fingerprints)| DesiredSpec {
            id: l.touchpoint.id(),
            kind: l.touchpoint.spec.name(),
            file: &l.file,
            spec: &l.spec,
            fingerprints,
        })
        .collect();
    let (changes, drift) = plan::diff(&specs, &live);
    let head = crate::git::head(dir);
    Ok(Plan {
        format_version: plan::FORMAT_VERSION.into(),
        touchctl_version: env!("CARGO_PKG_VERSION").into(),
        created_at: now(),
        registry: RegistryRef {
            id: registry.registry_id().to_string(),
            backend: registry.describe(),
        },
        source: Source {
            dir: dir.display().to_string(),
            commit: head.as_ref().and_then(|h| h.commit.clone()),
            dirty: head.is_some_and(|h| h.dirty),
        },
        summary: plan::summarize(&changes, &drift),
        changes,
        drift,
    })
}
