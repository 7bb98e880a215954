"""The stylesheet of the HTML report (inlined; ``%CARD%`` is the card width in px)."""

CSS = """
:root { --bg:#f5f6f8; --panel:#ffffff; --ink:#1f2933; --muted:#66727f; --line:#e3e7ec;
  --flag:#c62828; --flag-bg:#fff4f3; --ok:#2e7d32; --bar:#8da2b8; --accent:#3559a8; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 28px 28px 40px; }
h1 { font-size: 24px; margin: 0 0 2px; letter-spacing: -0.01em; }
h2 { font-size: 15px; margin: 0 0 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
.sub { color: var(--muted); margin: 0 0 18px; }
.stats { display:flex; flex-wrap:wrap; gap:12px; margin-bottom:14px; }
.stat { background:var(--panel); border:1px solid var(--line); border-radius:10px; padding:10px 16px; min-width:140px; }
.stat .v { font-size:22px; font-weight:650; }
.stat .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.stat.flag .v { color: var(--flag); }
dl.meta { display:grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap:4px 18px;
  margin:0 0 22px; padding:12px 16px; background:var(--panel); border:1px solid var(--line); border-radius:10px; }
dl.meta div { display:flex; gap:8px; min-width:0; }
dl.meta dt { color:var(--muted); white-space:nowrap; }
dl.meta dd { margin:0; font-weight:600; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.row { display:grid; grid-template-columns: minmax(0, 1.6fr) minmax(0, 1fr) minmax(0, 0.75fr); gap:18px;
  margin-bottom:26px; align-items:start; }
.panel { background:var(--panel); border:1px solid var(--line); border-radius:10px; padding:16px 18px; min-width:0; }
table.data { border-collapse:collapse; width:100%; font-variant-numeric: tabular-nums; }
table.data th { text-align:left; font-weight:600; color:var(--muted); font-size:12px; border-bottom:1px solid var(--line); padding:4px 5px; }
table.data td { padding:4px 5px; border-bottom:1px solid #f0f2f5; }
table.data td.num, table.data th.num { text-align:right; }
table.data td.name { max-width: 120px; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.scroll { max-height: 520px; overflow:auto; }
td.bar { width:30px; padding-left:2px; padding-right:0; }
.share { display:inline-block; height:8px; background:var(--flag); border-radius:4px; vertical-align:middle; opacity:.8; }
.given { color: var(--flag); font-weight:600; }
.sugg { color: var(--ok); font-weight:600; }
.arrow { color: var(--muted); padding: 0 4px; }
svg.hist { display:block; }
svg .gl { stroke:#edf0f3; }
svg .axis { stroke:#9aa5b1; }
svg .tick { fill:var(--muted); font-size:11px; }
svg .label { fill:var(--ink); font-size:12px; }
svg .bar { fill:var(--bar); }
svg .bar-flag { fill:var(--flag); }
.muted { color:var(--muted); }
.small { font-size:12px; margin:6px 0 0; }
.legend { color:var(--muted); margin:-4px 0 14px; }
.badge { display:inline-block; font-size:10px; font-weight:700; letter-spacing:.06em; padding:2px 6px;
  border-radius:4px; background:var(--flag); color:#fff; }
.gallery { display:grid; grid-template-columns: repeat(auto-fill, minmax(%CARD%px, 1fr)); gap:14px; }
.card { background:var(--panel); border:1px solid var(--line); border-radius:10px; overflow:hidden;
  display:flex; flex-direction:column; min-width:0; }
.card.flagged { border-color:var(--flag); box-shadow:0 0 0 1px var(--flag); background:var(--flag-bg); }
.thumb { display:flex; align-items:center; justify-content:center; height:132px; background:#eef1f4; }
.card.flagged .thumb { background:#fbe3e1; }
.thumb img { max-width:100%; max-height:124px; image-rendering: pixelated; border-radius:3px; }
.thumb.none { color:var(--muted); font-size:12px; padding:8px; text-align:center; }
.feats { padding:6px 12px 10px; border-top:1px solid var(--line); }
table.kv { width:100%; border-collapse:collapse; font-size:12px; font-variant-numeric: tabular-nums; }
table.kv th { text-align:left; font-weight:400; color:var(--muted); padding:1px 6px 1px 0; max-width:120px;
  overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
table.kv td { text-align:right; padding:1px 0; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; max-width:110px; }
.more { color:var(--muted); font-size:11px; }
.body { padding:8px 12px 10px; display:flex; flex-direction:column; gap:3px; }
.head { display:flex; justify-content:space-between; align-items:center; }
.rank { font-weight:700; color:var(--accent); }
.id { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size:12px;
  color:var(--muted); overflow:hidden; text-overflow:ellipsis; white-space:nowrap; direction:rtl; text-align:left; }
.id span { unicode-bidi:isolate; }
.labels { font-size:15px; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.nums { display:flex; justify-content:space-between; font-size:12px; color:var(--muted); font-variant-numeric: tabular-nums; }
.nums b { color:var(--ink); font-weight:600; }
footer { color:var(--muted); font-size:12px; margin-top:28px; text-align:center; }
@media (max-width: 1000px) { .row { grid-template-columns: 1fr 1fr; } .row > :first-child { grid-column: 1 / -1; } }
@media (max-width: 640px) { .row { grid-template-columns: 1fr; } }
"""

