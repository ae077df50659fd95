//! Everything one run answers, in the shape both the CLI's `--json` and the
//! browser page read.

use serde::Serialize;

use crate::inputs::Inputs;
use crate::model::{evaluate, Report};
use crate::scenario::assumptions;
use crate::sweep::{sweep, SweepPoint, SweepRange};
use crate::validate::InputError;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer {
    #[serde(flatten)]
    pub report: Report,
    pub assumptions: Vec<String>,
    pub sweep_range: SweepRange,
    pub sweep: Vec<SweepPoint>,
    pub inputs: Inputs,
}

/// Evaluates `inputs` and sweeps `range` (default: [`SweepRange::around`] the report).
pub fn answer(inputs: &Inputs, range: Option<SweepRange>) -> Result<Answer, InputError> {
    let report = evaluate(inputs)?;
    let sweep_range = range.unwrap_or_else(|| SweepRange::around(&report));
    let sweep = sweep(inputs, &sweep_range)?;
    Ok(Answer { report, assumptions: assumptions(inputs), sweep_range, sweep, inputs: inputs.clone() })
}
