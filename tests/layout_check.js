// Loaded into a copy of a built page by tests/test_browser.py: once the page and MathJax are
// done, lists every table, figure, image and display equation of the content column that a
// reader cannot see whole, and writes the list as JSON into <script id="kalm-layout">.
//
// The rule: a table or figure may be wider than the column only inside a scrolling box
// (overflow-x auto or scroll) that itself ends within the column, since its content is then
// reached by scrolling. A display equation must fit whole: it is read as one statement, and
// where scroll bars are hidden until used a scrolled equation looks cut. An element is cut when
// a box that hides overflow ends before it does (or, being such a box itself, holds wider
// content), and it is out of the column when its visible right edge is beyond the column's (the
// whole article scrolling does not count).
(function () {
  const EQUATIONS = 'mjx-container[display="true"], div.math';
  const SELECTOR = `table, img, figure, ${EQUATIONS}`;

  function describe(el) {
    let name = el.tagName.toLowerCase();
    if (el.id) name += "#" + el.id;
    const classes = (el.getAttribute("class") || "").trim().split(/\s+/).filter(Boolean);
    if (classes.length) name += "." + classes.slice(0, 3).join(".");
    const section = el.closest("section[id]");
    const text = (el.innerText || el.getAttribute("alt") || "").replace(/\s+/g, " ").trim();
    return `${name} (section #${section ? section.id : "-"}: "${text.slice(0, 50)}")`;
  }

  function scrolls(overflow) {
    return overflow === "auto" || overflow === "scroll";
  }

  function problem(el, column) {
    const right = column.getBoundingClientRect().right + 1;
    const equation = el.matches(EQUATIONS);
    const own = getComputedStyle(el).overflowX;
    if (own !== "visible" && el.scrollWidth > el.clientWidth + 1) {
      if (equation) {
        return `the equation (${el.scrollWidth}px) is wider than its box (${el.clientWidth}px)`;
      }
      if (!scrolls(own)) {
        return `its content (${el.scrollWidth}px) is cut at its width (${el.clientWidth}px)`;
      }
    }
    let extent = el.getBoundingClientRect().right;
    for (let box = el.parentElement; box && box !== column; box = box.parentElement) {
      const overflow = getComputedStyle(box).overflowX;
      const edge = box.getBoundingClientRect().right;
      if (overflow === "visible" || extent <= edge + 1) continue;
      if (equation || !scrolls(overflow)) {
        return `cut at ${Math.round(edge)}px by ${describe(box)} (overflow-x ${overflow}), ` +
          `its right edge is at ${Math.round(extent)}px`;
      }
      extent = edge; // reached by scrolling this box
    }
    if (extent > right) {
      return `right edge at ${Math.round(extent)}px, beyond the column's ${Math.round(right)}px`;
    }
    return null;
  }

  function check() {
    const column = document.querySelector("article.bd-article") || document.body;
    const found = [];
    for (const el of column.querySelectorAll(SELECTOR)) {
      if (el.getBoundingClientRect().width === 0) continue; // not displayed
      const why = problem(el, column);
      if (why) found.push(`${describe(el)}: ${why}`);
    }
    const out = document.createElement("script");
    out.type = "application/json";
    out.id = "kalm-layout";
    const report = { checked: column.querySelectorAll(SELECTOR).length, found };
    out.textContent = JSON.stringify(report).replace(/</g, "\\u003c");
    document.body.appendChild(out);
  }

  window.addEventListener("load", () => {
    const typeset = window.MathJax && MathJax.startup ? MathJax.startup.promise : Promise.resolve();
    typeset.then(() => setTimeout(check, 200));
  });
})();
