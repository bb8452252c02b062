// Display equations fit the text column (loaded on every page by Jupyter Book).
//
// MathJax 3 does not break long display equations into lines, and an equation cut at the column
// or scrolled (where scroll bars stay hidden until used, it looks cut) is not read whole. Once
// MathJax has typeset the page, an equation wider than its box is set in a smaller font, just
// enough to fit, but never below MIN_SCALE of the text size; an equation that would need less
// scrolls in its box instead (kalm.css), and the book's layout test names it.
(function () {
  const MIN_SCALE = 0.6;

  function fit() {
    for (const eq of document.querySelectorAll('mjx-container[display="true"]')) {
      // MathJax sets its own font size on the container: start from it on every resize
      if (eq.dataset.kalmFontSize === undefined) eq.dataset.kalmFontSize = eq.style.fontSize;
      eq.style.fontSize = eq.dataset.kalmFontSize;
      const scale = eq.clientWidth / eq.scrollWidth;
      if (scale >= 1) continue;
      const size = parseFloat(getComputedStyle(eq).fontSize);
      eq.style.fontSize = `${size * Math.max(MIN_SCALE, Math.floor(scale * 98) / 100)}px`;
    }
  }

  window.addEventListener("load", () => {
    if (!(window.MathJax && MathJax.startup)) return;
    MathJax.startup.promise.then(fit);
    window.addEventListener("resize", fit);
  });
})();
