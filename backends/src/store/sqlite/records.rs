//! SQLite store, record roles: customers ([`Customers`]), billing marks ([`BillingMarks`]), the
//! webhook outbox ([`WebhookOutbox`]) and API keys ([`ApiKeys`]). Latest write wins for each.

use async_trait::async_trait;

use super::*;

#[async_trait]
impl Customers for SqliteStore {
    async fn customer(&self, id: &str) -> Result<Option<Customer>> {
        let id = id.to_owned();
        Self::with(&self.reader, move |c| {
            let rec: Option<String> = c
                .prepare_cached("SELECT record FROM customers WHERE id = ?1")?
                .query_row([id], |r| r.get(0))
                .optional()?;
            Ok(rec.map(|r| serde_json::from_str(&r)).transpose()?)
        })
        .await
    }

    async fn put_customer(&self, id: &str, customer: &Customer) -> Result<()> {
        let (id, json, updated) = (
            id.to_owned(),
            serde_json::to_string(customer)?,
            customer.updated_ms,
        );
        Self::with(&self.writer, move |c| {
            c.prepare_cached(
                "INSERT INTO customers (id, record, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET record = excluded.record,
                                                updated_ms = excluded.updated_ms",
            )?
            .execute(params![id, json, updated])?;
            Ok(())
        })
        .await
    }

    async fn customers_since(&self, updated_ms: i64) -> Result<Vec<(String, Customer)>> {
        Self::with(&self.reader, move |c| {
            let mut stmt =
                c.prepare_cached("SELECT id, record FROM customers WHERE updated_ms >= ?1")?;
            let rows = stmt.query_map([updated_ms], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, rec) = row?;
                out.push((id, serde_json::from_str(&rec)?));
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl BillingMarks for SqliteStore {
    async fn billing_marks(&self) -> Result<Vec<(String, String, String)>> {
        Self::with(&self.reader, |c| {
            let mut stmt = c.prepare_cached("SELECT customer, meter, mark FROM billing_marks")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn put_billing_mark(&self, customer: &str, meter: &str, mark: &str) -> Result<()> {
        self.put_billing_marks(&[(customer.to_owned(), meter.to_owned(), mark.to_owned())])
            .await
    }

    async fn put_billing_marks(&self, marks: &[(String, String, String)]) -> Result<()> {
        let marks = marks.to_vec();
        Self::with(&self.writer, move |c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO billing_marks (customer, meter, mark) VALUES (?1, ?2, ?3)
                     ON CONFLICT (customer, meter) DO UPDATE SET mark = excluded.mark",
                )?;
                for (customer, meter, mark) in &marks {
                    stmt.execute(params![customer, meter, mark])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl WebhookOutbox for SqliteStore {
    async fn pending_webhooks(&self) -> Result<Vec<WebhookDelivery>> {
        Self::with(&self.reader, |c| {
            let mut stmt = c.prepare_cached("SELECT delivery FROM webhook_outbox")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for row in rows {
                out.push(serde_json::from_str(&row?)?);
            }
            Ok(out)
        })
        .await
    }

    async fn put_webhook(&self, delivery: &WebhookDelivery) -> Result<()> {
        let d = delivery.clone();
        let json = serde_json::to_string(&d)?;
        Self::with(&self.writer, move |c| {
            if d.done {
                c.prepare_cached("DELETE FROM webhook_outbox WHERE id = ?1 AND url = ?2")?
                    .execute(params![d.id, d.url])?;
            } else {
                c.prepare_cached(
                    "INSERT INTO webhook_outbox (id, url, delivery) VALUES (?1, ?2, ?3)
                     ON CONFLICT (id, url) DO UPDATE SET delivery = excluded.delivery",
                )?
                .execute(params![d.id, d.url, json])?;
            }
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl ApiKeys for SqliteStore {
    async fn api_keys(&self) -> Result<Vec<(String, String)>> {
        Self::with(&self.reader, |c| {
            let mut stmt = c.prepare_cached("SELECT id, record FROM api_keys")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn put_api_key(&self, id: &str, record: &str, version: u64) -> Result<()> {
        let (id, record) = (id.to_owned(), record.to_owned());
        Self::with(&self.writer, move |c| {
            c.prepare_cached(
                "INSERT INTO api_keys (id, record, version) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET record = excluded.record, version = excluded.version
                 WHERE excluded.version >= api_keys.version",
            )?
            .execute(params![id, record, version as i64])?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl MeterDefinitions for SqliteStore {
    async fn meter_definitions(&self) -> Result<Vec<(String, String)>> {
        Self::with(&self.reader, |c| {
            let mut stmt = c.prepare_cached("SELECT name, record FROM meter_definitions")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn put_meter_definition(&self, name: &str, record: &str, version: u64) -> Result<()> {
        let (name, record) = (name.to_owned(), record.to_owned());
        Self::with(&self.writer, move |c| {
            c.prepare_cached(
                "INSERT INTO meter_definitions (name, record, version) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET record = excluded.record,
                     version = excluded.version
                 WHERE excluded.version >= meter_definitions.version",
            )?
            .execute(params![name, record, version as i64])?;
            Ok(())
        })
        .await
    }
}
