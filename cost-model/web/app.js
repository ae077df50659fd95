// The page only moves data between the form and the library (compiled to
// wasm): every number shown comes from evaluate(), the same code as the CLI.
import init, { presets_json, scenario_json, evaluate } from './grpc_guard_cost_model.js';

const $ = (id) => document.getElementById(id);
const fields = [...document.querySelectorAll('[data-field]')];
const pricingSelects = [...document.querySelectorAll('[data-pricing]')];
let presets = [];

const money = (v) => {
  const cents = Math.abs(v).toLocaleString('en-US', { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  return (v < 0 && cents !== '0.00' ? '-' : '') + '$' + cents;
};
const number = (v) => v.toLocaleString('en-US', { maximumFractionDigits: 4 });
const traffic = (t) => t ? `${number(t.rps)} req/s (${number(Math.round(t.requests_per_month))} requests/month)` : null;

function show(id, text, value) {
  const el = $(id);
  el.textContent = text;
  if (value === null || value === undefined) delete el.dataset.value; else el.dataset.value = String(value);
}

function fill(inputs) {
  $('traffic-unit').value = 'rps';
  for (const el of fields) {
    const v = inputs[el.dataset.field];
    el.value = v === undefined || v === null ? '' : Array.isArray(v) ? v.join(',') : String(v);
  }
  for (const select of pricingSelects) select.value = inputs[select.dataset.pricing].name;
  update();
}

// The form as the library's Inputs; a field that is not a number is reported
// here, as the CLI's flag parser does, and everything else by the library.
function read() {
  const inputs = {};
  for (const el of fields) {
    const text = el.value.trim();
    const kind = el.dataset.optional;
    if (kind && text === '') continue;
    if (kind === 'list') {
      const weights = text.split(/[\s,]+/).filter((w) => w !== '').map(Number);
      const bad = weights.findIndex((w) => !Number.isFinite(w));
      if (bad >= 0) return { error: { field: `profile[${bad}]`, message: 'must be a number' } };
      inputs.profile = weights;
      continue;
    }
    const value = Number(text);
    if (text === '' || !Number.isFinite(value)) return { error: { field: el.dataset.field, message: 'must be a number' } };
    inputs[el.dataset.field] = value;
  }
  for (const select of pricingSelects) inputs[select.dataset.pricing] = presets.find((p) => p.name === select.value);
  return { inputs };
}

function showError(error) {
  // `profile[3]` and `rest_pricing.vcpu_price` belong beside `profile` and the REST select.
  let field = error.field.replace(/\[.*$/, '').replace(/\..*$/, '');
  if (field === 'requests_per_month') field = 'rps';
  const beside = $(`err-${field}`) || $('err-form');
  beside.textContent = (beside.id === 'err-form' && error.field ? `${error.field}: ` : '') + error.message;
  const input = $(field);
  if (input) input.classList.add('invalid');
  $('results').classList.add('stale');
}

function clearErrors() {
  for (const el of document.querySelectorAll('.error')) el.textContent = '';
  for (const el of document.querySelectorAll('.invalid')) el.classList.remove('invalid');
  $('results').classList.remove('stale');
}

const ROWS = [
  ['platform', (o) => o.platform, null],
  ['compute, active', (o) => money(o.breakdown.compute_active), (o) => o.breakdown.compute_active, 'compute_active'],
  ['compute, idle', (o) => money(o.breakdown.compute_idle), (o) => o.breakdown.compute_idle, 'compute_idle'],
  ['requests', (o) => money(o.breakdown.requests), (o) => o.breakdown.requests, 'requests'],
  ['fixed', (o) => money(o.breakdown.fixed), (o) => o.breakdown.fixed, 'fixed'],
  ['free tier', (o) => money(o.breakdown.free_tier), (o) => o.breakdown.free_tier, 'free_tier'],
  ['total per month', (o) => money(o.breakdown.total), (o) => o.breakdown.total, 'total'],
  ['active instance-hours', (o) => number(Math.round(o.usage.active_instance_hours)), (o) => o.usage.active_instance_hours, 'active_instance_hours'],
  ['idle instance-hours', (o) => number(Math.round(o.usage.idle_instance_hours)), (o) => o.usage.idle_instance_hours, 'idle_instance_hours'],
  ['cold starts per month', (o) => number(Math.round(o.cold_starts.per_month)), (o) => o.cold_starts.per_month, 'cold_starts'],
  ['requests that wait a cold start', (o) => `${(o.cold_starts.request_share * 100).toFixed(2)} %`, (o) => o.cold_starts.request_share, 'cold_share'],
  ['mean added latency', (o) => `${o.cold_starts.mean_added_latency_ms.toFixed(1)} ms`, (o) => o.cold_starts.mean_added_latency_ms, 'added_latency_ms'],
  ['stream reconnects per month', (o) => number(Math.round(o.forced_reconnects_per_month)), (o) => o.forced_reconnects_per_month, 'reconnects'],
];

function render(answer, chartSvg) {
  show('rest-total', money(answer.rest.breakdown.total), answer.rest.breakdown.total);
  show('grpc-total', money(answer.grpc.breakdown.total), answer.grpc.breakdown.total);
  $('grpc-replicas').textContent = number(answer.grpc.min_replicas);
  show('ratio', answer.ratio === null ? '— (REST is free)' : `${answer.ratio.toFixed(2)}×`, answer.ratio);
  show('break-even', traffic(answer.break_even) ?? 'none up to 1,000,000 req/s', answer.break_even?.rps);
  for (const mark of answer.ratio_falls_to) {
    show(`ratio-${mark.ratio}`, traffic(mark.at) ?? 'no traffic up to 1,000,000 req/s', mark.at?.rps);
  }
  const body = $('breakdown').tBodies[0];
  body.replaceChildren(...ROWS.map(([label, text, value, key]) => {
    const tr = document.createElement('tr');
    if (key === 'total') tr.className = 'total-row';
    const th = document.createElement('td');
    th.textContent = label;
    tr.append(th);
    for (const side of ['rest', 'grpc']) {
      const td = document.createElement('td');
      td.textContent = text(answer[side]);
      if (key) {
        td.id = `${side}-${key}`;
        td.dataset.value = String(value(answer[side]));
      }
      tr.append(td);
    }
    return tr;
  }));
  $('chart').innerHTML = chartSvg;
  $('assumptions').replaceChildren(...answer.assumptions.map((line) => {
    const li = document.createElement('li');
    li.textContent = line;
    return li;
  }));
}

function update() {
  clearErrors();
  const { inputs, error } = read();
  if (error) return showError(error);
  const reply = JSON.parse(evaluate(JSON.stringify(inputs), $('traffic-unit').value === 'month'));
  if (reply.error) return showError(reply.error);
  render(reply.ok, reply.ok.chart_svg);
  document.body.dataset.evaluations = String(Number(document.body.dataset.evaluations || 0) + 1);
}

await init();
presets = JSON.parse(presets_json());
for (const select of pricingSelects) {
  select.replaceChildren(...presets.map((p) => new Option(`${p.name} (${p.price_date})`, p.name)));
}
document.getElementById('inputs').addEventListener('input', update);
document.getElementById('inputs').addEventListener('change', update);
$('load-guide').addEventListener('click', () => fill(JSON.parse(scenario_json('guide'))));
$('load-default').addEventListener('click', () => fill(JSON.parse(scenario_json('default'))));
fill(JSON.parse(scenario_json('default')));
document.body.dataset.ready = '1';
