//! The browser page's entry points (wasm32 only). JSON in, JSON out: the page
//! sends [`Inputs`] as the user filled them in and renders the [`Answer`].

use serde::Serialize;
use wasm_bindgen::prelude::wasm_bindgen;

use crate::answer::{answer, Answer};
use crate::chart::chart_svg;
use crate::inputs::{rps_from_monthly, Inputs};
use crate::pricing::presets;
use crate::validate::InputError;

#[derive(Serialize)]
struct Evaluated {
    #[serde(flatten)]
    answer: Answer,
    chart_svg: String,
}

#[derive(Serialize)]
#[serde(rename_all = "lowercase")]
enum Reply {
    Ok(Box<Evaluated>),
    Error { field: String, message: String },
}

impl From<InputError> for Reply {
    fn from(e: InputError) -> Self {
        Reply::Error { field: e.field, message: e.problem.to_string() }
    }
}

/// The built-in presets, as a JSON array.
#[wasm_bindgen]
pub fn presets_json() -> String {
    serde_json::to_string(&presets()).unwrap_or_default()
}

/// The inputs of a named scenario (`"default"` for the defaults), as JSON.
#[wasm_bindgen]
pub fn scenario_json(name: &str) -> String {
    let inputs = match name {
        "default" => Some(Inputs::default()),
        _ => crate::scenario::scenarios().into_iter().find(|s| s.name == name).map(|s| s.inputs),
    };
    inputs.and_then(|i| serde_json::to_string(&i).ok()).unwrap_or_default()
}

/// Evaluates the page's inputs. With `per_month`, their `rps` holds requests
/// per month. Replies `{"ok": …answer, chart_svg}` or `{"error": {field, message}}`.
#[wasm_bindgen]
pub fn evaluate(inputs_json: &str, per_month: bool) -> String {
    serde_json::to_string(&reply(inputs_json, per_month)).unwrap_or_default()
}

fn reply(inputs_json: &str, per_month: bool) -> Reply {
    let mut inputs: Inputs = match serde_json::from_str(inputs_json) {
        Ok(inputs) => inputs,
        Err(e) => return Reply::Error { field: String::new(), message: e.to_string() },
    };
    if per_month {
        match rps_from_monthly(inputs.rps) {
            Ok(rps) => inputs.rps = rps,
            Err(e) => return e.into(),
        }
    }
    match answer(&inputs, None) {
        Ok(answer) => {
            let chart_svg = chart_svg(&inputs, &answer.sweep, &answer.report);
            Reply::Ok(Box::new(Evaluated { answer, chart_svg }))
        }
        Err(e) => e.into(),
    }
}
