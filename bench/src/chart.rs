//! The bench's chart: per setup, throughput relative to Envoy alone, on
//! each route (a PNG drawn with plotters).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::register_font;

use crate::report::Row;
use crate::setups::{Route, Setup};

/// A grouped bar chart: per setup, throughput relative to Envoy alone, on
/// each route.
pub fn chart(rows: &[Row], setups: &[Setup], font: &[u8], path: &Path) -> Result<(), String> {
    register_font("sans-serif", FontStyle::Normal, leak(font))
        .map_err(|_| "cannot load the chart font".to_string())?;
    let root = BitMapBackend::new(path, (1200, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let count = setups.len();
    let top = rows.iter().map(|r| r.vs_no_filter).fold(1.0f64, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "apikey-ratelimit: throughput relative to Envoy with no filter",
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(90)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(count as f64 - 0.5), 0f64..top)
        .map_err(|e| e.to_string())?;
    let ids: Vec<&str> = setups.iter().map(|s| s.id).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(count)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                ids.get(i as usize).map_or(String::new(), |s| s.to_string())
            } else {
                String::new()
            }
        })
        .x_label_style(("sans-serif", 14))
        .y_desc("req/s ÷ req/s of Envoy alone (same route)")
        .draw()
        .map_err(|e| e.to_string())?;
    let colors = [RGBColor(66, 133, 244), RGBColor(244, 160, 0)];
    for (r, route) in Route::ALL.iter().enumerate() {
        let color = colors[r];
        let offset = if r == 0 { -0.38 } else { 0.02 };
        // (x of the bar's left edge, ratio) for each setup measured on this route.
        let points: Vec<(f64, f64)> = setups
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let row = rows
                    .iter()
                    .find(|row| row.setup == s.id && row.route == *route)?;
                Some((i as f64 + offset, row.vs_no_filter))
            })
            .collect();
        chart
            .draw_series(
                points.iter().map(|&(x, ratio)| {
                    Rectangle::new([(x, 0.0), (x + 0.36, ratio)], color.filled())
                }),
            )
            .map_err(|e| e.to_string())?
            .label(route.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        let labels = points.iter().map(|&(x, ratio)| {
            Text::new(
                format!("{ratio:.2}"),
                (x + 0.02, ratio + top * 0.02),
                ("sans-serif", 13).into_font(),
            )
        });
        chart.draw_series(labels).map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// plotters keeps registered fonts for the life of the process.
fn leak(bytes: &[u8]) -> &'static [u8] {
    Box::leak(bytes.to_vec().into_boxed_slice())
}
