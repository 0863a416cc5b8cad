//! A row of the lookup table of `lookup_table` mode.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One pre-computed prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LookupRow {
    /// The model it is for (matched exactly).
    pub model_name: String,
    /// The hardware it is for; `None` matches any.
    pub hardware: Option<String>,
    /// Numeric feature values it was computed at (`input_tokens`, ...).
    pub features: BTreeMap<String, f64>,
    /// Expected execution time, ms.
    pub expect_ms: f64,
    /// Its error (standard deviation), ms.
    pub error_ms: f64,
    /// Quantile (as written in the file, e.g. `"0.99"`) to ms.
    pub quantiles: BTreeMap<String, f64>,
}
